"""The image-token map must agree with what the real processors and models do.

Tiny random-weight models with the released checkpoints' geometry; every check
compares against transformers' own output (token counts, image_grid_thw, the
anyres grid, the packed image features, mRoPE positions) or against the
processed pixels themselves (coordinate-encoding probe images tell which
original pixels each patch reads; see helpers_geometry).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers_geometry import FIXTURES, compare, pan_and_scan, real_geometry
from helpers_models import build
from PIL import Image

from vislens.models.vlm import VLM

SIZES = [(500, 300), (200, 640), (336, 336), (97, 61)]
QWEN = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")


FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl",
            "gemma3"]


def families(*slow: str) -> list:
    """FAMILIES, those read from look-alikes (FIXTURES) marked lookalike, those named `slow`
    marked slow."""
    return [pytest.param(f, marks=[*([pytest.mark.lookalike] if f in FIXTURES else []),
                                   *([pytest.mark.slow] if f in slow else [])])
            for f in FAMILIES]


@pytest.fixture(scope="module", params=families())
def vlm(request):
    model, proc = real_geometry(request.param) if request.param in FIXTURES else \
        build(request.param)
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
    if vlm.model_type in QWEN:
        # documented: one token per merge x merge block of the returned image_grid_thw
        merge = vlm.processor.image_processor.merge_size
        expected = [int(t.prod()) // merge**2 for t in batch.inputs["image_grid_thw"]]
        got = [int((ids[b] == vlm.image_token_id).sum()) for b in range(len(images))]
        assert got == expected


@pytest.mark.parametrize("vlm", families("llava_onevision"), indirect=True)  # + 1900x1500
def test_feature_rows_match_model_packing(vlm):
    """The model's own packed features have exactly one row per slot of the map."""
    sizes = SIZES + ([(1900, 1500)] if vlm.model_type == "llava_onevision" else [])
    images = [Image.new("RGB", s) for s in sizes]
    batch = vlm.prepare(images, ["what"] * len(images))
    feats = vlm.image_embeddings(batch)
    tm = batch.token_map
    for b, f in enumerate(feats):
        assert f.shape[0] == len(tm.image_positions(b)) + len(tm.newline_positions(b))
    if vlm.model_type in ("llava_next", "llava_onevision"):
        # newline slots are exactly where the model put its image_newline vector
        newline = vlm.model.model.image_newline
        for b, f in enumerate(feats):
            cols = np.sort(np.concatenate([tm.image_positions(b), tm.newline_positions(b)]))
            is_nl = np.isin(cols, tm.newline_positions(b))
            hits = torch.isclose(f, newline[None].to(f), atol=0).all(-1).numpy()
            assert np.array_equal(hits, is_nl)
            assert tm.grids[b][1][0] == int(is_nl.sum())  # one newline per high-res row


def test_anyres_grid_is_transformers_choice(vlm):
    if vlm.model_type not in ("llava_next", "llava_onevision"):
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
    if vlm.model_type not in QWEN:
        pytest.skip("Qwen families only")
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


# ---- boxes against the pixels each patch really sees (real processors, real geometry) ----------
REAL = ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
# crops + global view, tiles + thumbnail, a variable grid, a fixed square (tests/lookalikes/)
MORE = ["idefics3", "internvl", "mistral3", "paligemma"]
SIZES = [(640, 480), (200, 640), (1000, 250), (40, 30)]
CASES = [(f, s) for f in REAL + MORE for s in SIZES] + [
    ("llava_onevision", (2304, 1728)),  # 6x5 crops, anyres_max_9 shrinks 121x162 to 70x93
    ("llava_onevision", (1900, 1500)),
    ("gemma3", (640, 480)), ("gemma3", (200, 640)), ("gemma3", (40, 30)),
    # pan-and-scan on (the processor's default crop rules): 2 crops, the last one a pixel
    # narrower; 4 crops; 2 crops of a portrait; an aspect ratio too small to cut
    ("gemma3+pas", (641, 480)), ("gemma3+pas", (1100, 300)), ("gemma3+pas", (300, 700)),
    ("gemma3+pas", (500, 450)),
    ("idefics3", (2000, 1500)),  # shrunk to 1536 px, then 4x3 crops
    ("internvl", (2000, 1500)),
    ("mistral3", (2000, 1500)),  # shrunk to fit 1540 px, then whole 28-px cells
    # image splitting off: the global view alone, 81 tokens
    ("idefics3+nosplit", (640, 480)), ("idefics3+nosplit", (200, 640)),
]
# real_geometry reads these families from their look-alikes; the cases over a second are slow
LOOKALIKE = {"qwen2_vl", "qwen3_vl", "gemma3", *MORE}
SLOW_CASES = {("llava_onevision", (2304, 1728)), ("llava_onevision", (1900, 1500)),
              ("internvl", (640, 480)), ("internvl", (2000, 1500)), ("gemma3+pas", (641, 480)),
              ("gemma3+pas", (1100, 300))}


def case(family: str, size: tuple[int, int]):
    marks = [*([pytest.mark.lookalike] if family.split("+")[0] in LOOKALIKE else []),
             *([pytest.mark.slow] if (family, size) in SLOW_CASES else [])]
    return pytest.param(family, size, marks=marks, id=f"{family}-{size[0]}x{size[1]}")


CROPS = {(641, 480): 2, (1100, 300): 4, (300, 700): 2, (500, 450): 0}
# A decoded pixel is within 0.5 px of its coordinate (uint8 rounding of one resize, see
# helpers_geometry), so a patch's measured centre and extent are too, bar a fraction of a pixel
# where PIL truncates its kernel at the image border; 1 px leaves room for that and nothing
# else. It holds for shrunk OneVision grids as well: their measured centres are blended by
# transformers' own pack_image_features, which the geometry replays exactly. A pixel-shuffled
# token (Idefics3 3x3, InternVL 2x2, Mistral 3's 2x2 merger) is measured over every patch it
# merges (grouped by the model's own shuffle / unfold), and its box is their union: the same
# 1 px holds, as it does through Idefics3's three chained resizes.
TOL = 1.0


@pytest.fixture(scope="module")
def real_models():
    cache = {}

    def get(family):
        if family not in cache:
            if family == "gemma3+pas":
                model, proc = get("gemma3")
                cache[family] = model, pan_and_scan(proc)
            elif family == "idefics3+nosplit":
                model, proc = get("idefics3")
                proc = copy.deepcopy(proc)
                proc.image_processor.do_image_splitting = False
                cache[family] = model, proc
            else:
                cache[family] = real_geometry(family)
        return cache[family]

    return get


def _unpadded(config, size) -> tuple[int, int]:
    """The stitched high-res grid after transformers' unpadding, before any shrink."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    w, h = size
    g = config.vision_config.image_size // config.vision_config.patch_size
    nph, npw = get_anyres_image_grid_shape((h, w), config.image_grid_pinpoints,
                                           config.vision_config.image_size)
    return tuple(unpad_image(torch.zeros(1, nph * g, npw * g), (h, w)).shape[1:])


@pytest.mark.parametrize(("family", "size"), [case(f, s) for f, s in CASES])
def test_box_is_what_the_patch_sees(real_models, family, size):
    """Each token's box centre (and, unblended, its extent) is that of the pixels it reads."""
    model, proc = real_models(family)
    pas, nosplit = family == "gemma3+pas", family == "idefics3+nosplit"
    family = family.split("+")[0]
    tm, measured, centre = compare(family, model, proc, size)
    if nosplit:  # the global view alone
        assert len(tm) == 81 and set(tm.grids[0]) == {0}
    if pas:  # the crops are views of their own, each mapped back into the original image
        assert sorted(tm.grids[0]) == list(range(CROPS[size] + 1))
        assert set(tm.crop.tolist()) == set(range(CROPS[size] + 1))
    sees = measured[:, 0] > 0
    area = (tm.box[:, 2] - tm.box[:, 0]) * (tm.box[:, 3] - tm.box[:, 1])
    assert np.array_equal(area > 0, sees)
    err = np.abs(centre[sees] - measured[sees, 1:3])
    worst = int(np.flatnonzero(sees)[err.max(1).argmax()])
    assert err.max() <= TOL, (tm.cells(tm.position[[worst]])[0], measured[worst], tm.box[worst])

    shrunk = family == "llava_onevision" and tm.grids[0][1] != _unpadded(model.config, size)
    if size == (2304, 1728):
        assert shrunk and tm.grids[0][1] == (70, 93)  # the shrink is exercised
    unblended = np.ones(len(tm), dtype=bool) if not shrunk else tm.tile == 0
    extent = measured[unblended, 3:7]
    box = tm.box[unblended][:, [0, 2, 1, 3]]
    known = np.isfinite(extent)
    assert known.mean() > 0.9
    assert np.abs(box - extent)[known].max() <= TOL


@pytest.mark.parametrize("family", ["llava", "llava_onevision",
                                    pytest.param("idefics3", marks=pytest.mark.lookalike)])
def test_pixels_no_patch_sees_belong_to_no_token(real_models, family):
    """Strips cut away by a crop or left over at a crop's far edge are covered by no token."""
    model, proc = real_models(family)
    w, h = 640, 480
    tm, measured, _ = compare(family, model, proc, (w, h))
    centres = np.arange(w) + 0.5
    some_gap = False
    for tile in sorted(tm.grids[0]):
        rows = tm.tile == tile
        x0, x1 = measured[rows, 3], measured[rows, 4]
        # columns at least 1 px (the measuring error) clear of every patch of this view
        seen = ((centres[:, None] > x0[None] - TOL) & (centres[:, None] < x1[None] + TOL)).any(1)
        mask = np.zeros((h, w), dtype=bool)
        mask[:, ~seen] = True
        some_gap |= mask.any()
        pos = tm.positions(0, mask)
        assert not np.isin(pos, tm.position[rows]).any()
    assert some_gap
    everything = np.ones((h, w), dtype=bool)
    _, frac = tm.coverage(0, everything)
    assert np.allclose(frac, 1.0)


def test_llava_pad_to_square_boxes():
    model, proc = build("llava")
    proc.image_processor.do_pad = True
    vlm = VLM(model, proc, "llava")
    image = ramp(400, 200)
    w, h = image.size
    tm = vlm.prepare([image], ["what"]).token_map
    empty = (tm.box[:, 3] - tm.box[:, 1]) < 1
    assert empty.sum() > 0  # padding rows above and below carry no image
    pv = np.asarray(proc.image_processor(images=[image], do_rescale=False, do_normalize=False,
                                         return_tensors="np")["pixel_values"], dtype=np.float64)
    p = model.config.vision_config.patch_size
    for i in np.flatnonzero(~empty):
        r, g, _ = pv[0, :, tm.row[i] * p + p // 2, tm.col[i] * p + p // 2]
        x, y = r * (w - 1) / 255, g * (h - 1) / 255
        assert tm.box[i, 0] - 4 <= x <= tm.box[i, 2] + 4
        assert tm.box[i, 1] - 3 <= y <= tm.box[i, 3] + 3
