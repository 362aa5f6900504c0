"""Mean post-projector image embedding over reference images (Neo et al.'s ablation vector).

Computed once and cached on disk, keyed by the model (name, config, projector
weights) and by the exact image bytes, so reruns and other experiments reuse
it and a different model or data set never picks up a stale vector.
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
        if tensor.device.type == "meta":  # offloaded to disk by a device map: not in memory
            h.update(f"{tuple(tensor.shape)}{vlm.name}".encode())
            continue
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
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = vlm.prepare(chunk, [prompt] * len(chunk))
        feats = vlm.image_embeddings(batch)
        tm = batch.token_map
        for b, f in enumerate(feats):
            columns = np.sort(np.concatenate([tm.image_positions(b), tm.newline_positions(b)]))
            patch = ~np.isin(columns, tm.newline_positions(b))
            f = f[torch.as_tensor(patch, device=f.device)].float()
            total = f.sum(0) if total is None else total + f.sum(0)
            count += f.shape[0]
    mean = (total / count).to(vlm.dtype)
    root.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    torch.save(mean.cpu(), tmp)
    tmp.replace(file)
    return mean.to(vlm.device)
