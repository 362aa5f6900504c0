"""Which original pixels each image token really sees, read back from `pixel_values`.

The token map is checked against the processors themselves, not against a
second derivation of their arithmetic: two probe images per size encode every
pixel's x (then y) coordinate, go through the REAL image processor (rescale
and normalisation off, so values stay 0..255), and each patch of each tile is
decoded pixel by pixel. A token's measured centre is the mean coordinate of the
image pixels its patch holds; where the model blends patches (OneVision's
anyres_max_N bilinear shrink) the per-patch sums go through the model's own
`pack_image_features`, so the blend weights are transformers', not ours.

Encoding, per axis of n pixels (index i, continuous centre i + 0.5):
  R = 16 + round(239 * i / (n - 1))   coarse: picks the branch below, and R >= 8
                                      tells image pixels from the processors'
                                      zero padding
  G = tri(i), B = tri(i + 128)        triangle waves, one level per pixel
                                      (0..255..0, period 510)
Each processor resize re-quantises to uint8, so a decoded pixel is within 0.5 px
of the coordinate the resize put there (bicubic reproduces a linear ramp
exactly, so away from the folds there is no other error). The folds are blurred
by the resize, so each pixel is read from whichever triangle is further from a
fold (>= 63 px, more than the widest bicubic support met here, 2 x 6 px at a
2304 -> 384 shrink); the coarse ramp (+-0.5 level = +-n/478 px) then only has
to choose between branches >= 126 px apart. A patch's mean is thus within
0.5 px of the true centroid of what it saw; the only other error is at the
image border, where PIL renormalises the truncated kernel (a fraction of a
pixel, averaged over a patch).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

LOW = 16
PERIOD = 510
SHIFT = 128


def _tri(i: np.ndarray) -> np.ndarray:
    u = np.mod(i, PERIOD)
    return np.where(u <= 255, u, PERIOD - u)


def _channels(n: int) -> np.ndarray:
    i = np.arange(n)
    coarse = LOW + np.round((255 - LOW) * i / max(n - 1, 1))
    return np.stack([coarse, _tri(i), _tri(i + SHIFT)], -1).astype(np.uint8)


def probes(w: int, h: int) -> tuple[Image.Image, Image.Image]:
    """(x probe, y probe): every pixel's x (resp. y) index, encoded as above."""
    cx, cy = _channels(w), _channels(h)
    x = np.broadcast_to(cx[None, :, :], (h, w, 3))
    y = np.broadcast_to(cy[:, None, :], (h, w, 3))
    return Image.fromarray(np.ascontiguousarray(x)), Image.fromarray(np.ascontiguousarray(y))


def _branches() -> tuple[np.ndarray, np.ndarray]:
    """Per (G, B): the two index candidates (mod PERIOD) of the triangle further from a fold."""
    g, b = np.meshgrid(np.arange(256.0), np.arange(256.0), indexing="ij")
    use_g = np.minimum(g, 255 - g) >= np.minimum(b, 255 - b)
    v, phase = np.where(use_g, g, b), np.where(use_g, 0, SHIFT)
    return (v - phase).astype(np.float32), (-v - phase).astype(np.float32)


BRANCHES = _branches()


def decode(rgb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(valid, coordinate) of channel-first pixels [3, ...]; coordinate = index + 0.5."""
    r, g, b = (np.rint(c).astype(np.uint8) for c in rgb)  # processors hand back whole levels
    coarse = ((np.arange(256, dtype=np.float32) - LOW) * (max(n - 1, 1) / (255 - LOW)))[r]
    best = None
    for table in BRANCHES:
        base = table[g, b]
        cand = base + PERIOD * np.rint((coarse - base) / PERIOD)
        best = cand if best is None else np.where(np.abs(cand - coarse) < np.abs(best - coarse),
                                                  cand, best)
    return r >= LOW // 2, best.astype(np.float64) + 0.5


def _sums(px: np.ndarray, py: np.ndarray, w: int, h: int) -> np.ndarray:
    """[..., 7] per patch [..., 3, p, p] of both probes: image pixels, sum of x, sum of y, x0,
    x1, y0, y1 (extent of its image pixels: outermost centres plus half the pixel pitch)."""
    valid, x = decode(np.moveaxis(px, -3, 0), w)
    _, y = decode(np.moveaxis(py, -3, 0), h)
    out = [valid.sum((-2, -1)), (x * valid).sum((-2, -1)), (y * valid).sum((-2, -1))]
    for v, across in ((x, -2), (y, -1)):
        lo = np.where(valid, v, np.inf).min((-2, -1))
        hi = np.where(valid, v, -np.inf).max((-2, -1))
        lines = valid.any(across).sum(-1)  # image columns (rows) the patch holds
        with np.errstate(invalid="ignore", divide="ignore"):
            half = np.where(lines >= 3, (hi - lo) / (lines - 1) / 2, np.nan)
        out += [lo - half, hi + half]
    return np.stack(out, -1).astype(np.float64)


def _tiles(pv: np.ndarray, patch: int) -> np.ndarray:
    """[tiles, 3, S, S] -> [tiles, g*g, 3, patch, patch]: the conv patch embedding's patches."""
    t, c, s, _ = pv.shape
    g = s // patch  # the stride-`patch` conv never sees the last s - g*patch pixels
    pv = pv[:, :, :g * patch, :g * patch].reshape(t, c, g, patch, g, patch)
    return pv.transpose(0, 2, 4, 1, 3, 5).reshape(t, g * g, c, patch, patch)


def _grid(pv: np.ndarray, patch: int) -> np.ndarray:
    """[3, H, W] -> [gh * gw, 3, patch, patch] in raster order (a rectangular image)."""
    c, hh, ww = pv.shape
    gh, gw = hh // patch, ww // patch
    pv = pv[:, :gh * patch, :gw * patch].reshape(c, gh, patch, gw, patch)
    return pv.transpose(1, 3, 0, 2, 4).reshape(gh * gw, c, patch, patch)


def _merge(sub: np.ndarray) -> np.ndarray:
    """[..., k, 7] per-patch stats of the k patches one token merges -> [..., 7]."""
    return np.concatenate([sub[..., :3].sum(-2), sub[..., [3]].min(-2), sub[..., [4]].max(-2),
                           sub[..., [5]].min(-2), sub[..., [6]].max(-2)], -1)


def _shuffled(family: str, model, sums: np.ndarray) -> np.ndarray:
    """Per-patch stats [tiles, g*g, 7] grouped into tokens by the model's own pixel shuffle:
    [tiles * tokens, 7]. Both shuffles lay a token's vector out patch by patch (each patch's
    7 values contiguous), so the merged patches are read back from it."""
    t, n, _ = sums.shape
    x = torch.from_numpy(sums)
    if family == "idefics3":
        out = model.model.connector.pixel_shuffle(x, model.config.scale_factor)
    else:
        g = int(round(n ** 0.5))
        out = model.model.pixel_shuffle(x.reshape(t, g, g, 7), model.config.downsample_ratio)
    out = out.reshape(t, -1, out.shape[-1]).numpy()
    return _merge(out.reshape(t, out.shape[1], -1, 7)).reshape(-1, 7)


QWEN = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")


def _pooled(sums: np.ndarray, side: int) -> np.ndarray:
    """Per-patch sums [views, g*g, 7] of raster patches average-pooled side x side cells
    (Gemma 3's 4x4 pool): counts and coordinate sums add, extents take min / max."""
    v, n, _ = sums.shape
    g = int(round(n ** 0.5))
    k = g // side
    blocks = sums.reshape(v, side, k, side, k, 7).transpose(0, 1, 3, 2, 4, 5)
    blocks = blocks.reshape(v * side * side, k * k, 7)
    return np.concatenate([blocks[:, :, :3].sum(1), blocks[:, :, [3]].min(1),
                           blocks[:, :, [4]].max(1), blocks[:, :, [5]].min(1),
                           blocks[:, :, [6]].max(1)], 1)


def seen(family: str, model, image_processor, size: tuple[int, int],
         **processor_kwargs) -> np.ndarray:
    """[image patch tokens, 7] in LM sequence order: image pixels seen, centre x, centre y,
    x0, x1, y0, y1 (extent of those pixels).

    Centres are NaN where a token saw padding only, extents where it saw fewer
    than 3 image columns (rows). For blended cells the centre is the
    pixel-weighted mean of its sources (blend weight x image pixels of each
    source) and the extent is meaningless (a blend of the sources' extents).
    """
    w, h = size
    px, py = (np.asarray(image_processor(images=[im], do_rescale=False, do_normalize=False,
                                         return_tensors="np", **processor_kwargs)["pixel_values"])
              for im in probes(w, h))
    vc = model.config.vision_config
    if family in ("llava", "paligemma"):
        sums = _sums(_tiles(px, vc.patch_size), _tiles(py, vc.patch_size), w, h)[0]
    elif family in ("idefics3", "internvl"):
        if family == "idefics3":  # [1, crops, 3, S, S]: this sample's crops, global view last
            px, py = px[0], py[0]
        p = vc.patch_size if family == "idefics3" else vc.patch_size[0]
        sums = _shuffled(family, model, _sums(_tiles(px, p), _tiles(py, p), w, h))
    elif family == "mistral3":
        import copy

        p = vc.patch_size
        sub = _sums(_grid(px[0], p), _grid(py[0], p), w, h)  # raster patches of the image
        merger = copy.deepcopy(model.model.multi_modal_projector.patch_merger)
        merger.merging_layer = torch.nn.Identity()  # its own unfold groups them, no weights
        hh, ww = px.shape[-2:]
        grouped = merger(torch.from_numpy(sub), [(hh, ww)]).numpy()  # [tokens, 7 * m * m]
        sums = _merge(np.swapaxes(grouped.reshape(len(grouped), 7, -1), 1, 2))
    elif family in ("llava_next", "llava_onevision"):
        feats = torch.from_numpy(_sums(_tiles(px[0], vc.patch_size),
                                       _tiles(py[0], vc.patch_size), w, h))
        newline = torch.tensor([-1.0] + [0.0] * 6, dtype=torch.float64)
        kwargs = dict(image_features=[feats], image_sizes=torch.tensor([[h, w]]),
                      image_newline=newline)
        if family == "llava_onevision":
            kwargs["vision_aspect_ratio"] = model.config.vision_aspect_ratio
        else:
            kwargs["vision_feature_select_strategy"] = model.config.vision_feature_select_strategy
        packed = model.model.pack_image_features(**kwargs)[0][0].numpy()
        sums = packed[packed[:, 0] >= 0]
    elif family == "gemma3":
        # every view (whole image, then pan-and-scan crops) read as 14-px patches, pooled 4x4
        per_patch = _sums(_tiles(px, vc.patch_size), _tiles(py, vc.patch_size), w, h)
        sums = _pooled(per_patch, int(round(model.config.mm_tokens_per_image ** 0.5)))
    elif family in QWEN:
        p, m = vc.patch_size, vc.spatial_merge_size
        # rows are (merged row, merged col, sub row, sub col) x (C, T, p, p); one frame suffices
        fx, fy = (a.reshape(-1, 3, vc.temporal_patch_size, p, p)[:, :, 0] for a in (px, py))
        sub = _sums(fx, fy, w, h).reshape(-1, m * m, 7)
        sums = np.concatenate([sub[:, :, :3].sum(1), sub[:, :, [3]].min(1), sub[:, :, [4]].max(1),
                               sub[:, :, [5]].min(1), sub[:, :, [6]].max(1)], 1)
    else:
        raise ValueError(family)
    n = sums[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.where(n[:, None] > 0, sums[:, 1:3] / n[:, None], np.nan)
    return np.concatenate([n[:, None], centre, sums[:, 3:]], 1)


# the families whose geometry test_models_geometry.py reads from their look-alikes
FIXTURES = {"qwen2_vl": "Qwen2-VL-7B-Instruct", "qwen3_vl": "Qwen3-VL-8B-Instruct",
            "gemma3": "gemma-3-4b-it"}


def real_geometry(family: str):
    """(model, processor) with the released checkpoints' geometry, Qwen's real pixel bounds too.

    The families added after the paper's four read their geometry from their look-alike
    checkpoints (tests/lookalikes/), whose processors carry the released settings."""
    from helpers_models import build
    from lookalikes import FAMILY, PAPER, checkpoint_dir

    import vislens

    later = {f: name for name, f in FAMILY.items() if name not in PAPER}
    if family in later:
        vlm = vislens.load(str(checkpoint_dir(later[family])))
        return vlm.model, vlm.processor
    model, proc = build(family)
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        proc.image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": 3136, "longest_edge": 12845056})
    return model, proc


def compare(family: str, model, proc, size: tuple[int, int]):
    """(token map, `seen` [n, 7], box centres [n, 2]) for one image of `size`."""
    from vislens.models.families.internvl import tiling
    from vislens.models.vlm import VLM

    vlm = VLM(model, proc, family)
    tm = vlm.prepare([Image.new("RGB", size)], ["what"]).token_map
    extra = {}  # what each processor passes its image processor on every call
    if family == "gemma3":
        from vislens.models.families.gemma3 import pan_and_scan_settings

        extra = pan_and_scan_settings(proc)
    elif family == "internvl":
        extra = tiling(proc)
    elif family == "mistral3":
        extra = {"patch_size": proc.patch_size * proc.spatial_merge_size}
    measured = seen(family, model, proc.image_processor, size, **extra)
    if len(measured) != len(tm):
        raise AssertionError(f"{len(measured)} measured tokens, {len(tm)} in the map")
    centre = np.stack([(tm.box[:, 0] + tm.box[:, 2]) / 2, (tm.box[:, 1] + tm.box[:, 3]) / 2], 1)
    return tm, measured, centre


def pan_and_scan(proc):
    """A copy of a Gemma 3 processor with pan-and-scan on (the processor's default crop rules),
    as a preprocessor_config.json with "do_pan_and_scan": true loads it."""
    import copy

    from vislens.models.families import family_for

    proc = copy.deepcopy(proc)
    ip = proc.image_processor
    ip.do_pan_and_scan = True
    ip.pan_and_scan_min_crop_size, ip.pan_and_scan_max_num_crops = 256, 4
    ip.pan_and_scan_min_ratio_to_activate = 1.2
    family_for("gemma3").configure(proc)
    return proc
