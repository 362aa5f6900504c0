"""Mean post-projector image embedding over reference images (Neo et al.'s ablation vector).

Computed once and cached on disk, keyed by the model (name, config, projector
weights) and by the exact image bytes, so reruns and other experiments reuse
it and a different model or data set never picks up a stale vector.

A family that also adds image features inside its LM (Qwen3-VL's DeepStack) gets
the same kind of mean for those: per injection layer, the mean injected feature over
every image patch token of the references (`mean_injected_features`), so a mean
ablation replaces what every path of the image carries with its reference mean.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def cache_root() -> Path:
    return Path(os.environ.get("VISLENS_CACHE", Path.home() / ".cache" / "vislens"))


def model_key(vlm) -> str:
    h = hashlib.sha256()
    h.update(vlm.family.encode())
    h.update(json.dumps(vlm.config.to_dict(), sort_keys=True, default=str).encode())
    from vislens.interventions.vision import projector_module

    try:
        projector = projector_module(vlm)
    except ValueError:  # a generic family: the whole model's weights then
        projector = vlm.model
    for name, tensor in sorted(projector.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def data_key(images: list[Image.Image]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.size}{im.mode}".encode())
        h.update(np.asarray(im.convert("RGB")).tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def mean_image_embedding(vlm, images: list[Image.Image], batch_size: int = 8,
                         cache_dir: str | Path | None = None, prompt: str = "describe this image ."
                         ) -> torch.Tensor:
    """Mean over every image PATCH token (newline slots excluded) of every reference image."""
    if not images:
        raise ValueError("mean_image_embedding needs at least one reference image")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    file = root / f"mean_embedding_{model_key(vlm)}_{data_key(images)}.pt"
    if file.is_file():
        return torch.load(file, map_location=vlm.device)
    total, count = None, 0
    for rows, _ in _patch_rows(vlm, images, batch_size, prompt):
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += rows.shape[0]
    mean = (total / count).to(vlm.dtype)
    _save(file, mean.cpu())
    return mean.to(vlm.device)


@torch.no_grad()
def mean_injected_features(vlm, images: list[Image.Image], batch_size: int = 8,
                           cache_dir: str | Path | None = None,
                           prompt: str = "describe this image .") -> list[torch.Tensor]:
    """Per injection layer, the mean injected (DeepStack) feature over every image patch
    token of the reference images: what `ablate(..., injected=...)` puts in for a mean
    ablation. Empty for a family without injection."""
    if not getattr(vlm.spec, "deepstack", False):
        return []
    if not images:
        raise ValueError("mean_injected_features needs at least one reference image")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    file = root / f"mean_injected_{model_key(vlm)}_{data_key(images)}.pt"
    if file.is_file():
        return [t.to(vlm.device) for t in torch.load(file, map_location=vlm.device)]
    totals, count = None, 0
    for _, injected in _patch_rows(vlm, images, batch_size, prompt):
        sums = [x.sum(0) for x in injected]
        totals = sums if totals is None else [t + s for t, s in zip(totals, sums, strict=True)]
        count += injected[0].shape[0]
    means = [(t / count).to(vlm.dtype).cpu() for t in totals]
    _save(file, means)
    return [m.to(vlm.device) for m in means]


def _patch_rows(vlm, images, batch_size: int, prompt: str):
    """Per reference image: (its patch tokens' features [n, hidden] float32, and per injection
    layer its patch tokens' injected features); newline slots excluded."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = vlm.prepare(chunk, [prompt] * len(chunk))
        feats = vlm.image_embeddings(batch)
        tm = batch.token_map
        for b, f in enumerate(feats):
            columns = np.sort(np.concatenate([tm.image_positions(b), tm.newline_positions(b)]))
            patch = torch.as_tensor(~np.isin(columns, tm.newline_positions(b)), device=f.device)
            injected = [] if feats.injected is None else \
                [x[patch.to(x.device)].float() for x in feats.injected[b]]
            yield f[patch].float(), injected


def _save(file: Path, value) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(file)
