"""Every command end to end on the look-alikes of SmolVLM-Instruct (idefics3), InternVL3-8B-hf,
Mistral-Small-3.1 and paligemma2-3b-mix-224 (tests/lookalikes/), with answers made
right by construction (answer_head.py: only the unembedding is fitted).

The scenes, data sets and CLI calls are those of test_real_checkpoints.py, kept to the
smallest sizes that still run every path: one selected image, two perception items.
What is asserted is that each experiment ran on the real geometry and kept samples
(crops + global view, tiles + thumbnail, a break-delimited grid, a prefix LM), not the
numbers it found.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from answer_head import fitted_dir, mc_answer, mc_items, scenes
from e2e import cli, rows_of
from lookalikes import FAMILY, INTERNVL, MISTRAL3, PALIGEMMA, SMOLVLM
from test_real_checkpoints import TEXT_TASKS

import vislens

NAMES = (SMOLVLM, INTERNVL, MISTRAL3, PALIGEMMA)
# patch tokens of a 640x480 scene: 12 crops + global view of 9x9, 12 tiles + thumbnail of
# 16x16, an 18x23 grid, SigLIP's 16x16
PATCHES_640x480 = {"SmolVLM-Instruct": 1053, "InternVL3-8B-hf": 3328,
                   "Mistral-Small-3.1-24B-Instruct-2503": 414, PALIGEMMA: 256}
# marker tokens of that image's block: crop markers (<fake_token_around_image>, the pieces
# of <row_r_col_c>, crop-row newlines, <global-img>), <img> </img>, 17 breaks + [IMG_END]
MARKERS_640x480 = {"SmolVLM-Instruct": None, "InternVL3-8B-hf": 2,
                   "Mistral-Small-3.1-24B-Instruct-2503": 18, PALIGEMMA: 0}


@pytest.fixture(scope="module", params=NAMES)
def fitted(request):
    path = fitted_dir(request.param)
    return request.param, path, vislens.load(str(path))


def test_info_counts_the_image_tokens(fitted):
    name, path, vlm = fitted
    facts = cli("info", "--model", path)
    assert facts["family"] == FAMILY[name] and facts["layers"] == vlm.num_layers
    assert facts["image_tokens_for"]["640x480 (photo)"]["image_tokens"] == PATCHES_640x480[name]
    markers = len(vlm.prepare([scenes()[0].image], ["x"]).token_map.marker_positions(0))
    assert markers == (MARKERS_640x480[name] if MARKERS_640x480[name] is not None else markers)
    assert markers > 0 or name == PALIGEMMA


def test_eval_and_ablate_keep_samples(fitted, data, tmp_path):
    name, path, vlm = fitted
    s = cli("eval", "--model", path, "--n", 1)
    assert s["questions"] == {"generative": 1, "polling": 2, "vqa": 2}
    out = tmp_path / "ablate"  # the generative setting (40 new tokens a condition) left out
    s = cli("ablate", "--model", path, "--data", f"coco:{data['coco']}", "--n", 1,
            "--settings", "polling,vqa", "--ig-steps", 2,
            "--conditions", "object+1,ig-matched,all-but-object+1",
            "--reference", f"imagenet:{data['imagenet']}", "--out", out)
    assert s["n_kept"] == {"polling": 1, "vqa": 1}, s["n_kept"]
    for setting in ("polling", "vqa"):
        mine = {r["condition"]: r for r in rows_of(out) if r["setting"] == setting}
        assert mine["clean"]["correct"] and not mine["noised"]["correct"]
        assert mine["object+1"]["n_tokens"] == mine["ig-matched"]["n_tokens"] > 0
        assert mine["object+1"]["n_tokens"] + mine["all-but-object+1"]["n_tokens"] == \
            PATCHES_640x480[name]


def test_logit_lens_finds_the_fitted_patches(fitted, data, tmp_path):
    name, path, vlm = fitted
    out = tmp_path / "lens"
    s = cli("logit-lens", "--model", path, "--data", f"coco:{data['lens']}", "--n", 1,
            "--viewers", 0, "--out", out)
    rows = rows_of(out)
    last = vlm.num_layers
    assert s["n_layers"] == last + 1
    # one stored row per patch token, each with an entry per layer
    assert len(rows) == PATCHES_640x480[name] and all(len(r["hit"]) == last + 1 for r in rows)
    hits = [r for r in rows if r["hit"][last] and r["coverage"] >= 0.5]
    assert len(hits) >= 8 and s["hit_rate"] > 0


def test_knockout_and_attention_keep_samples(fitted, data, tmp_path):
    name, path, vlm = fitted
    s = cli("knockout", "--model", path, "--data", f"coco:{data['coco']}", "--n", 1,
            "--settings", "vqa", "--out", tmp_path / "knockout")
    assert s["n_kept"] == {"vqa": 1}
    rows = rows_of(tmp_path / "knockout")
    assert all(r["kept"] for r in rows if r["condition"] == "clean")
    s = cli("attention", "--model", path, "--data", f"coco:{data['lens']}", "--n", 1,
            "--viewers", 0, "--out", tmp_path / "attention")
    assert s["n_images"] == 1


def test_perception_commands_run_every_source(fitted, data, tmp_path):
    name, path, vlm = fitted
    s = cli("perceive", "--model", path, "--n", 2, "--tasks", "fg-seg,sem-seg",
            "--data", f"sem-seg=voc:{data['voc']}", "--out", tmp_path / "perceive")
    for task in ("fg-seg", "sem-seg"):
        assert s["tasks"][task]["n"] == 2 and s["tasks"][task]["projector"] is not None
    stats = [json.loads(r["stats"]) for r in rows_of(tmp_path / "perceive")
             if r["task"] == "fg-seg"]
    assert all({"vision", "projector", "values/0", "keys/1"} <= set(st) for st in stats)
    s = cli("artifacts", "--model", path, "--n", 1, "--n-images", 2, "--z", 0,
            "--min-score", 0, "--layers", "0,1", "--out", tmp_path / "artifacts")
    assert any(s["n_flagged"].values())
    assert {r["condition"] for r in rows_of(tmp_path / "artifacts")} == {"clean", "knockout"}
    s = cli("prefix", "--model", path, "--prefix", "classes", "--tasks", "sem-seg", "--n", 1,
            "--out", tmp_path / "prefix")
    assert set(s["delta"]) >= {"sem-seg"}
    assert {r["condition"] for r in rows_of(tmp_path / "prefix")} == {"clean", "prefix"}


def test_surface_reads_the_fitted_choices(fitted, data, tmp_path):
    name, path, vlm = fitted
    s = cli("surface", "--model", path, "--data", f"blink:{data['blink']}", "--n", 2,
            "--out", tmp_path / "surface")
    assert s["n_items"] == 2 and s["n_scored"] == 1
    rows = sorted(rows_of(tmp_path / "surface"), key=lambda r: int(r["item"]))
    for k, (r, item) in enumerate(zip(rows, mc_items(), strict=True)):
        assert r["model_text"] == mc_answer(k, item), (name, r)
    assert set(json.loads(rows[0]["readout"])) >= {"values/0", "projector", "vision"}


def test_text_tasks_read_the_prompt_after_the_markers(fitted):
    """Text spans of the prompt map to their own ids whatever frames the image (markers,
    breaks, a prefix-LM suffix)."""
    name, path, vlm = fitted
    from vislens.experiments.perception.features import after_image, text_columns

    batch = vlm.prepare([scenes()[0].image], ["Is there a giraffe in this image?"])
    cols = text_columns(vlm, batch, 0, "Is there a giraffe in this image?", (9, 18))
    assert vlm.tokenizer.decode(batch.input_ids[0, cols]).strip() == "a giraffe"
    question = after_image(batch, 0)
    assert not np.isin(question, batch.token_map.marker_positions(0)).any()
    assert set(cols) <= set(question.tolist())
    assert TEXT_TASKS  # the text tasks above ran on these columns
