"""Mean post-projector image embedding over reference images (Neo et al.'s ablation vector).

Computed once and cached on disk, keyed by the model (name, config, projector
weights) and by the exact image bytes, so reruns and other experiments reuse
it and a different model or data set never picks up a stale vector.

The images are streamed: the key is hashed one image at a time and the mean is
summed a batch at a time, so a reference set (ImageNet val: 50,000 images) is
never in memory at once. An iterable that can be iterated again (a list, a
`vislens.data.imagenet.ImageFolder`) is read twice, once for the key and once,
only when the key is not cached, for the mean; a one-shot iterator is read once,
hashed and summed together.

A family that also adds image features inside its LM (Qwen3-VL's DeepStack) gets
the same kind of mean for those: per injection layer, the mean injected feature over
every image patch token of the references (`mean_injected_features`), so a mean
ablation replaces what every path of the image carries with its reference mean.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def cache_root() -> Path:
    return Path(os.environ.get("VISLENS_CACHE", Path.home() / ".cache" / "vislens"))


def model_key(vlm) -> str:
    h = hashlib.sha256()
    h.update(vlm.model_type.encode())
    h.update(json.dumps(vlm.config.to_dict(), sort_keys=True, default=str).encode())
    from vislens.interventions.vision import projector_module

    try:
        projector = projector_module(vlm)
    except ValueError:  # a generic family: the whole model's weights then
        projector = vlm.model
    for name, tensor in sorted(projector.state_dict().items()):
        h.update(name.encode())
        if tensor.device.type == "meta":  # offloaded to disk by a device map: not in memory
            h.update(f"{tuple(tensor.shape)}{vlm.name}".encode())
            continue
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def data_key(images: Iterable[Image.Image], h=None) -> str:
    """Hash of the images' sizes, modes and RGB bytes, in order, one image at a time
    (h: a sha256 to continue, for a set hashed a batch at a time)."""
    h = hashlib.sha256() if h is None else h
    for im in images:
        h.update(f"{im.size}{im.mode}".encode())
        h.update(np.asarray(im.convert("RGB")).tobytes())
    return h.hexdigest()[:20]


def _batches(images: Iterable[Image.Image], size: int) -> Iterator[list[Image.Image]]:
    it = iter(images)
    while chunk := list(islice(it, size)):
        yield chunk
        del chunk  # released before the next batch is read


@torch.no_grad()
def mean_image_embedding(vlm, images: Iterable[Image.Image], batch_size: int = 8,
                         cache_dir: str | Path | None = None, prompt: str = "describe this image ."
                         ) -> torch.Tensor:
    """Mean over every image PATCH token (newline slots excluded) of every reference image.

    images: any iterable of PIL images; at most `batch_size` of them are held at once
    when it yields them lazily (see the module docstring).
    """
    (mean,) = _reference_means(vlm, images, "mean_embedding", batch_size, cache_dir, prompt,
                               lambda rows, injected: [rows])
    return mean


@torch.no_grad()
def mean_injected_features(vlm, images: Iterable[Image.Image], batch_size: int = 8,
                           cache_dir: str | Path | None = None,
                           prompt: str = "describe this image .") -> list[torch.Tensor]:
    """Per injection layer, the mean injected (DeepStack) feature over every image patch
    token of the reference images: what `ablate(..., injected=...)` puts in for a mean
    ablation. Empty for a family without injection."""
    if not getattr(vlm.family, "deepstack", False):
        return []
    return _reference_means(vlm, images, "mean_injected", batch_size, cache_dir, prompt,
                            lambda rows, injected: injected)


def _reference_means(vlm, images: Iterable[Image.Image], kind: str, batch_size: int,
                     cache_dir, prompt: str, pick: Callable) -> list[torch.Tensor]:
    """Means over the references' patch tokens of the tensors `pick(rows, injected)` chooses,
    cached under `kind`, streamed a batch at a time (see the module docstring)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    one_shot = iter(images) is images
    if not one_shot:
        file = root / f"{kind}_{model_key(vlm)}_{data_key(images)}.pt"
        if file.is_file():
            return _load(file, vlm.device)
    h = hashlib.sha256()
    totals, count, n_images = None, 0, 0
    for chunk in _batches(images, batch_size):
        n_images += len(chunk)
        if one_shot:
            data_key(chunk, h)
        for rows, injected in _patch_rows(vlm, chunk, prompt):
            sums = [x.sum(0) for x in pick(rows, injected)]
            totals = sums if totals is None else [t + x for t, x in zip(totals, sums, strict=True)]
            count += rows.shape[0]
        del chunk  # this batch's images go before the next batch is read
    if n_images == 0:
        raise ValueError(f"{kind.replace('_', ' ')} needs at least one reference image")
    if one_shot:
        file = root / f"{kind}_{model_key(vlm)}_{data_key([], h)}.pt"
    means = [(t / count).to(vlm.dtype).cpu() for t in totals]
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    torch.save(means, tmp)
    tmp.replace(file)
    return [m.to(vlm.device) for m in means]


def _load(file: Path, device) -> list[torch.Tensor]:
    value = torch.load(file, map_location=device)
    return [value] if isinstance(value, torch.Tensor) else list(value)  # older single-tensor files


def _patch_rows(vlm, chunk: list[Image.Image], prompt: str) -> Iterator[tuple]:
    """Per image of one batch: (its patch tokens' features [n, hidden] float32, and per
    injection layer its patch tokens' injected features); newline slots excluded."""
    batch = vlm.prepare(chunk, [prompt] * len(chunk))
    feats = vlm.image_embeddings(batch)
    tm = batch.token_map
    for b, f in enumerate(feats):
        columns = np.sort(np.concatenate([tm.image_positions(b), tm.newline_positions(b)]))
        patch = torch.as_tensor(~np.isin(columns, tm.newline_positions(b)), device=f.device)
        injected = [] if feats.injected is None else \
            [x[patch.to(x.device)].float() for x in feats.injected[b]]
        yield f[patch].float(), injected


def image_digest(im: Image.Image) -> str:
    """One image's identity for overlap checks: its size and RGB bytes (mode ignored)."""
    h = hashlib.sha256(f"{im.size}".encode())
    h.update(np.asarray(im.convert("RGB")).tobytes())
    return h.hexdigest()


def overlap(references: Iterable[Image.Image], evaluated: Iterable[Image.Image]) -> tuple[int, int]:
    """(how many reference images are also evaluated images, pixel for pixel; how many
    reference images there are). A reference image is hashed only when its size is one of
    the evaluated images' sizes; a folder (`vislens.data.imagenet.ImageFolder`) is sized
    from the file headers, so a 50,000-image ImageNet val set is not decoded for this."""
    evaluated = list(evaluated)
    digests = {image_digest(im) for im in evaluated}
    sizes = {im.size for im in evaluated} | {im.size[::-1] for im in evaluated}
    files = getattr(references, "files", None)
    shared = total = 0
    if files is not None:  # an ImageFolder: (label, path) pairs
        from vislens.data._io import read_image

        for _, path in files:
            total += 1
            with Image.open(path) as head:
                if head.size not in sizes:
                    continue
            shared += image_digest(read_image(path)) in digests
        return shared, total
    for im in references:
        total += 1
        shared += im.size in sizes and image_digest(im) in digests
    return shared, total
