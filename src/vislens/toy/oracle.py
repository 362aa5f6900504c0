"""Oracle image tokens: what a perfect vision side would hand the language model.

Each patch token is the coverage-weighted sum of its objects' word embeddings
(E[color] + E[shape]) plus a learned background vector. The LM's own input
embeddings are used, so an object's token already "reads" as its words: the LM
only has to learn a one-hop lookup from question words to matching image tokens,
and the logit lens later finds the object's words at object tokens.

Nothing here is LLaVA specific: callers pass the patch grid and the embedding
table of whatever LM they train.
"""

from __future__ import annotations

import numpy as np
import torch

from vislens.data import shapesworld
from vislens.data.samples import Sample

MAX_OBJECTS = 4


def coverage(sample: Sample, grid_h: int, grid_w: int) -> np.ndarray:
    """Fraction of every patch covered by each instance: float32 [MAX_OBJECTS, grid_h*grid_w].

    The image is assumed to fill the grid exactly (resize, no crop), as in the toy.
    """
    out = np.zeros((MAX_OBJECTS, grid_h * grid_w), dtype=np.float32)
    for k, inst in enumerate(sample.instances[:MAX_OBJECTS]):
        h, w = inst.mask.shape
        if h % grid_h or w % grid_w:
            raise ValueError(f"mask {h}x{w} does not tile a {grid_h}x{grid_w} grid; "
                             "resize the image to a multiple of the patch grid")
        cells = inst.mask.reshape(grid_h, h // grid_h, grid_w, w // grid_w).mean(axis=(1, 3))
        out[k] = cells.reshape(-1)
    return out


def attribute_ids(sample: Sample, word_id: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each instance's color and shape word (-1 where no instance)."""
    colors = np.full(MAX_OBJECTS, -1, dtype=np.int64)
    shapes = np.full(MAX_OBJECTS, -1, dtype=np.int64)
    for k, inst in enumerate(sample.instances[:MAX_OBJECTS]):
        colors[k] = word_id[inst.attributes["color"]]
        shapes[k] = word_id[inst.attributes["shape"]]
    return colors, shapes


def oracle_tokens(cov: torch.Tensor, colors: torch.Tensor, shapes: torch.Tensor,
                  embed: torch.Tensor, background: torch.Tensor,
                  scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """[B, P, D] tokens from coverage [B, K, P], attribute ids [B, K] and the embedding table.

    Gradients flow into `embed`, `background` and `scale`, so stage A learns the
    word embeddings the image tokens are made of.
    """
    valid = (colors >= 0).to(embed.dtype)  # [B, K]
    obj = (embed[colors.clamp(min=0)] + embed[shapes.clamp(min=0)]) * valid[..., None]  # [B,K,D]
    tokens = torch.einsum("bkp,bkd->bpd", cov, obj)
    bg = (1.0 - cov.sum(dim=1)).clamp(min=0.0)  # [B, P]
    return (tokens + bg[..., None] * background) * scale


def shape_order_key(sample: Sample) -> list[int]:
    """Indices of instances in caption order (the fixed shape order)."""
    return sorted(range(len(sample.instances)),
                  key=lambda i: shapesworld.SHAPES.index(sample.instances[i].attributes["shape"]))
