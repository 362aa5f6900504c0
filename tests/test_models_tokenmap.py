"""Mask -> tokens, dilation, boxes and loading errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_models import build, save
from PIL import Image

import vislens
from vislens.models.vlm import VLM


@pytest.fixture(scope="module")
def llava():
    model, proc = build("llava")
    return VLM(model, proc, "llava")


@pytest.fixture(scope="module")
def next_vlm():
    model, proc = build("llava_next")
    return VLM(model, proc, "llava_next")


def test_mask_to_tokens_exact_cells(llava):
    # 336x336: cell (r, c) is exactly pixels [14c, 14c+14) x [14r, 14r+14)
    tm = llava.prepare([Image.new("RGB", (336, 336))], ["what"]).token_map
    mask = np.zeros((336, 336), dtype=bool)
    mask[28:56, 42:70] = True  # rows 2-3, cols 3-4
    cells = tm.cells(tm.positions(0, mask), 0)
    assert sorted(map(tuple, cells[:, 1:])) == [(2, 3), (2, 4), (3, 3), (3, 4)]
    mask[56, 70] = True  # one pixel of cell (4, 5)
    assert len(tm.positions(0, mask)) == 5
    assert len(tm.positions(0, mask, min_coverage=0.5)) == 4
    pos, frac = tm.coverage(0, mask)
    assert np.isclose(frac.max(), 1.0) and np.isclose(np.sort(frac)[-5], 1 / 196)


def test_mask_follows_center_crop(llava):
    # 672x336 -> resized 672x336, crop keeps x in [168, 504): left quarter has no token
    tm = llava.prepare([Image.new("RGB", (672, 336))], ["what"]).token_map
    left = np.zeros((336, 672), dtype=bool)
    left[:, :160] = True
    assert len(tm.positions(0, left)) == 0
    mid = np.zeros((336, 672), dtype=bool)
    mid[0:14, 168:182] = True
    assert tuple(tm.cells(tm.positions(0, mid), 0)[0]) == (0, 0, 0)
    with pytest.raises(ValueError, match="ORIGINAL image"):
        tm.positions(0, np.zeros((336, 336), dtype=bool))


def test_dilation_8_neighbour_and_clipped(llava):
    tm = llava.prepare([Image.new("RGB", (336, 336))], ["what"]).token_map
    grid = {tuple(c[1:]): p for c, p in zip(tm.cells(tm.image_positions(0), 0),
                                            tm.image_positions(0), strict=True)}
    centre = [grid[(5, 5)]]
    assert len(tm.dilate(centre, 1, 0)) == 9
    assert len(tm.dilate(centre, 2, 0)) == 25
    assert len(tm.dilate([grid[(0, 0)]], 1, 0)) == 4
    assert np.array_equal(tm.dilate(centre, 0, 0), centre)
    assert len(tm.last_row(0)) == 24
    assert set(tm.cells(tm.last_row(0), 0)[:, 1]) == {23}
    box = tm.boxes(centre, 0)[0]
    assert np.allclose(box, [70, 70, 84, 84])


def test_dilation_stays_in_its_tile(next_vlm):
    tm = next_vlm.prepare([Image.new("RGB", (500, 300))], ["what"]).token_map
    base = tm.image_positions(0, tile=0)
    grown = tm.dilate(base[-1:], 3, 0)  # bottom-right base cell: next to the high-res tile
    assert np.isin(grown, base).all()
    assert len(grown) == 16
    hi = tm.image_positions(0, tile=1)
    assert tm.last_row(0).tolist() == hi[tm.row[np.isin(tm.position, hi) & (tm.batch == 0)]
                                         == tm.grids[0][1][0] - 1].tolist()
    assert not np.isin(tm.newline_positions(0), tm.image_positions(0)).any()


def test_batched_positions_are_columns(llava):
    batch = llava.prepare([Image.new("RGB", (336, 336))] * 2,
                          ["what", "is there a red circle in this image ?"])
    tm = batch.token_map
    ids = batch.input_ids
    for b in range(2):
        assert (ids[b, torch.as_tensor(tm.image_positions(b))] == llava.image_token_id).all()
    assert tm.image_positions(0)[0] > tm.image_positions(1)[0]  # left padding shifts sample 0


def test_load_local_dirs_and_errors(tmp_path):
    for family in ("llava", "qwen2_5_vl"):
        path = save(family, tmp_path / family)
        vlm = vislens.load(path)
        assert vlm.model_type == family and vlm.num_layers == 2
        batch = vlm.prepare([Image.new("RGB", (120, 90))], ["what"])
        assert len(batch.token_map) > 0
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="LLaVA-1.5.*Qwen2.5-VL"):
        vislens.load(bad)
    with pytest.raises(FileNotFoundError, match="local Hugging Face directory"):
        vislens.load(tmp_path / "nowhere")


def test_toy_missing_or_loads():
    from vislens.models.loading import assets_dir

    if (assets_dir() / "toy" / "config.json").is_file():
        assert vislens.load("toy").model_type == "llava"
    else:
        with pytest.raises(FileNotFoundError, match="toy"):
            vislens.load("toy")
