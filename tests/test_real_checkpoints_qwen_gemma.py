"""Every experiment through the CLI on the Qwen2-VL, Qwen3-VL and Gemma 3 look-alikes.

The fixtures (tests/lookalikes/) get an unembedding fitted by construction
(answer_head.py), so the experiments that keep only correctly answered samples keep
some and run their conditions on the real geometries: Qwen3-VL's DeepStack (the mean
ablation replaces the injected features too), Gemma 3's bidirectional image blocks and
256-token images. Sizes are the smallest that run every path once (n = 1 or 2): this
module checks that each experiment runs and keeps samples, test_real_checkpoints.py
checks the experiments' numbers on the paper fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from answer_head import answer, fitted_dir, mc_answer, mc_items, scenes
from e2e import cli, rows_of
from lookalikes import GEMMA3, QWEN2VL, QWEN3VL
from typer.testing import CliRunner

from vislens.cli import app

NAMES = (QWEN2VL, QWEN3VL, GEMMA3)
FAMILY = {QWEN2VL: "qwen2_vl", QWEN3VL: "qwen3_vl", GEMMA3: "gemma3"}
LAYERS = {QWEN2VL: 2, QWEN3VL: 4, GEMMA3: 2}
CONDITIONS = "object,object+1,random-matched,ig-matched,all-but-object+1"


@pytest.fixture(scope="module", params=NAMES)
def fitted(request) -> tuple[str, Path]:
    return request.param, fitted_dir(request.param)


def test_info(fitted):
    name, path = fitted
    s = cli("info", "--model", path)
    assert s["family"] == FAMILY[name]


def test_ablate_keeps_samples(fitted, data, tmp_path):
    """Mean ablation (reference images; for Qwen3-VL the injected features' means too), the
    noise filter, integrated gradients (through the injected features on Qwen3-VL)."""
    name, path = fitted
    out = tmp_path / "ablate"
    s = cli("ablate", "--model", path, "--data", f"coco:{data['coco']}", "--n", 1,
            "--settings", "vqa", "--ig-steps", 1, "--conditions", CONDITIONS,
            "--reference", f"imagenet:{data['imagenet']}", "--out", out)
    assert s["n_kept"] == {"vqa": 1}, s["n_kept"]
    rows = rows_of(out)
    assert {r["condition"] for r in rows} == {"clean", "noised", *CONDITIONS.split(",")}
    clean = [r for r in rows if r["condition"] == "clean"][0]
    assert clean["text"].strip() == answer(scenes()[0], "vqa", False)


def test_logit_lens_finds_the_fitted_hits(fitted, data, tmp_path):
    name, path = fitted
    s = cli("logit-lens", "--model", path, "--data", f"coco:{data['lens']}", "--n", 1,
            "--viewers", 1, "--out", tmp_path / "lens")
    assert s["n_images"] == 1 and s["n_layers"] == LAYERS[name] + 1
    assert s["hit_rate"] > 0 and s["per_layer"][LAYERS[name]] > 0


def test_knockout_keeps_samples(fitted, data, tmp_path):
    name, path = fitted
    out = tmp_path / "knockout"
    windows = ["--window", 2, "--stride", 2] if LAYERS[name] > 2 else []  # 2 windows + all
    s = cli("knockout", "--model", path, "--data", f"coco:{data['coco']}", "--n", 1,
            "--settings", "vqa", *windows, "--out", out)
    assert s["n_kept"] == {"vqa": 1}
    conditions = {r["condition"] for r in rows_of(out)}
    assert len(conditions) > 1 and "clean" in conditions


def test_attention(fitted, data, tmp_path):
    name, path = fitted
    s = cli("attention", "--model", path, "--data", f"coco:{data['lens']}", "--n", 1,
            "--viewers", 1, "--out", tmp_path / "attention")
    assert s["n_images"] == 1 and s["n_layers"] == LAYERS[name]
    image = [m for m in s["per_layer"]["image"] if m is not None]
    assert len(image) == LAYERS[name] and all(0 < m < 1 for m in image)


def test_perceive(fitted, data, tmp_path):
    """Every source of every layer is computed, the vision encoder's (through the family's
    projector grouping: Qwen's 2x2 merge windows, Gemma's 4x4 pool) included."""
    name, path = fitted
    out = tmp_path / "perceive"
    s = cli("perceive", "--model", path, "--tasks", "fg-seg,sem-seg", "--n", 2,
            "--data", f"sem-seg=voc:{data['voc']}", "--out", out)
    assert s["tasks"]["fg-seg"]["n"] == 2 and s["tasks"]["sem-seg"]["n"] == 2
    lm = {f"{k}/{layer}" for k in ("keys", "values") for layer in range(LAYERS[name])}
    for r in rows_of(out):
        stats = json.loads(r["stats"])
        wanted = lm | {"projector"} | ({"vision"} if r["task"] == "fg-seg" else set())
        assert wanted <= set(stats), (r["task"], sorted(stats))


def test_artifacts(fitted, data, tmp_path):
    name, path = fitted
    s = cli("artifacts", "--model", path, "--n", 1, "--n-images", 2, "--z", 0, "--min-score", 0,
            "--layers", "0,1", "--data", f"mc=blink:{data['blink']}",
            "--out", tmp_path / "artifacts")
    assert any(s["n_flagged"].values()) and s["multiple_choice"]["n"] == 1


def test_prefix(fitted, data, tmp_path):
    name, path = fitted
    out = tmp_path / "prefix"
    s = cli("prefix", "--model", path, "--prefix", "classes", "--tasks", "sem-seg", "--n", 1,
            "--out", out)
    assert {r["condition"] for r in rows_of(out)} == {"clean", "prefix"}
    assert "sem-seg" in s["delta"]


def test_surface_reads_the_fitted_choices(fitted, data, tmp_path):
    name, path = fitted
    out = tmp_path / "surface"
    s = cli("surface", "--model", path, "--data", f"blink:{data['blink']}", "--n", 2,
            "--out", out)
    assert s["n_items"] == 2
    rows = sorted(rows_of(out), key=lambda r: int(r["item"]))
    assert [r["model_text"] for r in rows] == [mc_answer(k, item)
                                               for k, item in enumerate(mc_items())]


def test_eval(fitted):
    name, path = fitted
    s = cli("eval", "--model", path, "--n", 1)
    assert all(0.0 <= a <= 1.0 for a in s["accuracy"].values())


@pytest.fixture
def generic_gemma3(monkeypatch) -> Path:
    """The fitted Gemma 3 look-alike as a model type without a family module: the generic
    fallback (positions only) on a model that answers right."""
    from vislens.models.families import FAMILIES

    monkeypatch.delitem(FAMILIES, "gemma3")
    return fitted_dir(GEMMA3)


def test_generic_fallback_runs_the_layout_free_experiments(generic_gemma3, data, tmp_path):
    """Without a layout: ablation of register / random-K tokens, knockout of image ->
    question, the logit lens over every image token; what needs pixels is one line."""
    path, coco = generic_gemma3, f"coco:{data['coco']}"
    out = tmp_path / "ablate"
    s = cli("ablate", "--model", path, "--data", coco, "--n", 1, "--settings", "vqa",
            "--reference", f"imagenet:{data['imagenet']}", "--out", out)
    assert s["n_kept"] == {"vqa": 1}
    conditions = {r["condition"] for r in rows_of(out)} - {"clean", "noised"}
    assert conditions and all(c == "register" or c.startswith("random-") for c in conditions)
    assert "random-matched" not in conditions
    s = cli("knockout", "--model", path, "--data", coco, "--n", 1, "--settings", "vqa",
            "--out", tmp_path / "knockout")
    assert s["n_kept"] == {"vqa": 1}
    assert set(s["relative_accuracy"]) == {"image->question"}
    assert all(v is not None for v in s["relative_accuracy"]["image->question"])
    s = cli("logit-lens", "--model", path, "--data", f"coco:{data['lens']}", "--n", 1,
            "--out", tmp_path / "lens")
    assert s["layout"] is False and s["hit_rate"] is None and s["viewer"] == []
    assert s["n_image_tokens"] == 256 and s["image_hit_rate"] > 0  # the fitted hits
    assert s["n_object_patches"] == 0
    for command, extra in (("ablate", ["--conditions", "object,random-40"]),
                           ("knockout", ["--conditions", "object->last"])):
        bad = tmp_path / f"bad-{command}"
        r = CliRunner().invoke(app, [command, "--model", str(path), "--data", coco, "--n", "1",
                                     "--out", str(bad), *extra])
        assert r.exit_code == 2 and "needs a token layout" in r.output, r.output
        assert not bad.exists()
