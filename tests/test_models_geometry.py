"""The image-token map must agree with what the real processors and models do.

Tiny random-weight models with the released checkpoints' geometry; every check
compares against transformers' own output (token counts, image_grid_thw, the
anyres grid, the packed image features, mRoPE positions) or against the
processed pixels themselves (a coordinate-ramp image tells which original
pixel landed in each token's cell).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_models import build
from PIL import Image

from vislens.models.vlm import VLM

torch.set_num_threads(2)
SIZES = [(500, 300), (200, 640), (336, 336), (97, 61)]


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision", "qwen2_5_vl"])
def vlm(request):
    model, proc = build(request.param)
    return VLM(model, proc, request.param)


def ramp(w: int, h: int) -> Image.Image:
    """R encodes x, G encodes y (linear, so resizing keeps the code)."""
    x = np.round(np.arange(w) * 255 / max(w - 1, 1))
    y = np.round(np.arange(h) * 255 / max(h - 1, 1))
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = x[None, :]
    arr[..., 1] = y[:, None]
    return Image.fromarray(arr)


def test_token_counts_match_processor(vlm):
    images = [Image.new("RGB", s, (90, 20, 30)) for s in SIZES]
    batch = vlm.prepare(images, ["describe this image ."] * len(images))
    tm = batch.token_map
    ids = batch.input_ids.cpu().numpy()
    for b in range(len(images)):
        n_tokens = int((ids[b] == vlm.image_token_id).sum())
        assert len(tm.image_positions(b)) + len(tm.newline_positions(b)) == n_tokens
        cols = np.sort(np.concatenate([tm.image_positions(b), tm.newline_positions(b)]))
        assert np.array_equal(cols, np.flatnonzero(ids[b] == vlm.image_token_id))
    if vlm.family != "llava":
        sizes = [(s[1], s[0]) for s in SIZES]
        expected = vlm.processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
        got = [int((ids[b] == vlm.image_token_id).sum()) for b in range(len(images))]
        assert got == list(expected)


def test_feature_rows_match_model_packing(vlm):
    """The model's own packed features have exactly one row per slot of the map."""
    sizes = SIZES + ([(1900, 1500)] if vlm.family == "llava_onevision" else [])
    images = [Image.new("RGB", s) for s in sizes]
    batch = vlm.prepare(images, ["what"] * len(images))
    feats = vlm.image_embeddings(batch)
    tm = batch.token_map
    for b, f in enumerate(feats):
        assert f.shape[0] == len(tm.image_positions(b)) + len(tm.newline_positions(b))
    if vlm.family in ("llava_next", "llava_onevision"):
        # newline slots are exactly where the model put its image_newline vector
        newline = vlm.model.model.image_newline
        for b, f in enumerate(feats):
            cols = np.sort(np.concatenate([tm.image_positions(b), tm.newline_positions(b)]))
            is_nl = np.isin(cols, tm.newline_positions(b))
            hits = torch.isclose(f, newline[None].to(f), atol=0).all(-1).numpy()
            assert np.array_equal(hits, is_nl)
            assert tm.grids[b][1][0] == int(is_nl.sum())  # one newline per high-res row


def test_anyres_grid_is_transformers_choice(vlm):
    if vlm.family not in ("llava_next", "llava_onevision"):
        pytest.skip("anyres families only")
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    cfg = vlm.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    for w, h in SIZES:
        tm = vlm.prepare([Image.new("RGB", (w, h))], ["what"]).token_map
        nph, npw = get_anyres_image_grid_shape((h, w), cfg.image_grid_pinpoints,
                                               cfg.vision_config.image_size)
        unpadded = unpad_image(torch.zeros(1, nph * g, npw * g), (h, w)).shape[1:]
        assert tm.grids[0][0] == (g, g)
        assert tm.grids[0][1] == tuple(unpadded)
        assert tm.crop[tm.tile == 1].max() <= nph * npw


def test_qwen_rows_cols_are_mrope_positions(vlm):
    if vlm.family != "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL only")
    images = [Image.new("RGB", s) for s in SIZES]
    batch = vlm.prepare(images, ["what"] * len(images))
    tm = batch.token_map
    pos, _ = vlm.model.model.get_rope_index(
        batch.input_ids, image_grid_thw=batch.inputs["image_grid_thw"],
        attention_mask=batch.attention_mask, mm_token_type_ids=batch.inputs["mm_token_type_ids"])
    for b in range(len(images)):
        cols = tm.image_positions(b)
        rows = np.flatnonzero(tm.batch == b)
        h = pos[1, b, cols].numpy()
        w = pos[2, b, cols].numpy()
        assert np.array_equal(h - h.min(), tm.row[rows])
        assert np.array_equal(w - w.min(), tm.col[rows])
        grid = batch.inputs["image_grid_thw"][b].tolist()
        assert tm.grids[b][0] == (grid[1] // 2, grid[2] // 2)


def _processed(vlm, image: Image.Image):
    ip = vlm.processor.image_processor
    return ip(images=[image], do_rescale=False, do_normalize=False,
              return_tensors="np")


def _cell_pixels(vlm, tm, image, b=0):
    """(row index in map, decoded original x, y) sampled at each token cell's centre."""
    out = _processed(vlm, image)
    pv = np.asarray(out["pixel_values"], dtype=np.float64)
    cfg = vlm.config
    w, h = image.size
    rows = np.flatnonzero(tm.batch == b)
    samples = []
    if vlm.family == "llava":
        p = cfg.vision_config.patch_size
        for i in rows:
            y, x = tm.row[i] * p + p // 2, tm.col[i] * p + p // 2
            samples.append((i, pv[0, :, y, x]))
    elif vlm.family in ("llava_next", "llava_onevision"):
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        p = cfg.vision_config.patch_size
        g = cfg.vision_config.image_size // p
        nph, npw = get_anyres_image_grid_shape((h, w), cfg.image_grid_pinpoints,
                                               cfg.vision_config.image_size)
        index = torch.arange(nph * g * npw * g).view(1, nph * g, npw * g)
        kept = unpad_image(index, (h, w))[0]
        if tm.grids[b][1] != tuple(kept.shape):
            pytest.skip("OneVision shrank this grid; cells are blends of several patches")
        for i in rows:
            if tm.tile[i] == 0:
                samples.append((i, pv[0, 0, :, tm.row[i] * p + p // 2, tm.col[i] * p + p // 2]))
                continue
            flat = int(kept[tm.row[i], tm.col[i]])
            big_r, big_c = divmod(flat, npw * g)
            crop = 1 + (big_r // g) * npw + big_c // g
            assert crop == tm.crop[i]
            samples.append((i, pv[0, crop, :, (big_r % g) * p + p // 2, (big_c % g) * p + p // 2]))
    else:
        p, m = cfg.vision_config.patch_size, cfg.vision_config.spatial_merge_size
        tp = cfg.vision_config.temporal_patch_size
        _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
        patches = pv.reshape(gh // m, gw // m, m, m, 3, tp, p, p)
        for i in rows:
            # centre of the merged cell = top-left pixel of its bottom-right sub-patch
            samples.append((i, patches[tm.row[i], tm.col[i], m - 1, m - 1, :, 0, 0, 0]))
    decoded = []
    for i, rgb in samples:
        decoded.append((i, rgb[0] * (w - 1) / 255, rgb[1] * (h - 1) / 255))
    return decoded


@pytest.mark.parametrize("size", [(500, 300), (200, 640), (150, 150)])
def test_boxes_hold_the_pixels_the_token_sees(vlm, size):
    image = ramp(*size)
    tm = vlm.prepare([image], ["what"]).token_map
    w, h = size
    tol_x, tol_y = 2 + (w - 1) / 255, 2 + (h - 1) / 255
    checked = 0
    width, height = tm.box[:, 2] - tm.box[:, 0], tm.box[:, 3] - tm.box[:, 1]
    for i, x, y in _cell_pixels(vlm, tm, image):
        x0, y0, x1, y1 = tm.box[i]
        same_tile = tm.tile == tm.tile[i]
        if width[i] < 0.9 * np.median(width[same_tile]) or \
                height[i] < 0.9 * np.median(height[same_tile]):
            continue  # cut by padding: its centre pixel may be padding
        assert x0 - tol_x <= x <= x1 + tol_x, (i, x, tm.box[i])
        assert y0 - tol_y <= y <= y1 + tol_y, (i, y, tm.box[i])
        checked += 1
    assert checked > 20


def test_llava_pad_to_square_boxes():
    model, proc = build("llava")
    proc.image_processor.do_pad = True
    vlm = VLM(model, proc, "llava")
    image = ramp(400, 200)
    tm = vlm.prepare([image], ["what"]).token_map
    empty = (tm.box[:, 3] - tm.box[:, 1]) < 1
    assert empty.sum() > 0  # padding rows above and below carry no image
    for i, x, y in _cell_pixels(vlm, tm, image):
        if not empty[i]:
            assert tm.box[i, 0] - 4 <= x <= tm.box[i, 2] + 4
            assert tm.box[i, 1] - 3 <= y <= tm.box[i, 3] + 3
