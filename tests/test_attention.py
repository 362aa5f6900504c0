"""The attention view: stored attention against an eager reference, the split of each row
into image / text / first-token mass, queries, resume, the CLI and the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_models import build
from typer.testing import CliRunner

from vislens.cli import app
from vislens.data import shapesworld
from vislens.data.samples import Instance, Sample
from vislens.experiments import attention
from vislens.experiments.stats import bootstrap_columns
from vislens.models.vlm import VLM
from vislens.runs.rundir import RunDir
from vislens.toy.build import ToySpec, build_model, build_processor

TINY = ToySpec(vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, lm_hidden=32,
               lm_layers=2, lm_heads=2, lm_mlp=64)
SIZES = {"llava_next": [(300, 180), (150, 300)], "qwen2_5_vl": [(150, 110), (100, 160)]}


def resized(sample: Sample, width: int, height: int) -> Sample:
    """The scene stretched to width x height (masks with it): other sizes give other anyres /
    Qwen grids, so a batch of two is left-padded."""
    from PIL import Image

    def mask(m):
        return np.asarray(Image.fromarray(m).resize((width, height), Image.NEAREST))

    insts = [Instance(i.name, mask(i.mask), i.box, i.attributes) for i in sample.instances]
    return Sample(f"{sample.id}-{width}x{height}", sample.image.resize((width, height)), insts,
                  sample.meta)


@pytest.fixture(scope="module", params=[pytest.param("llava_next", marks=pytest.mark.slow),
                                        "qwen2_5_vl"])
def family_run(request, tmp_path_factory):
    family = request.param
    model, proc = build(family)
    vlm = VLM(model, proc, family, name=f"tiny {family}")
    eager_model, _ = build(family, attn="eager")
    eager_model.load_state_dict(model.state_dict())
    eager = VLM(eager_model, proc, family)
    scenes = shapesworld.generate(2, seed=5, size=300)
    samples = [resized(s, *size) for s, size in zip(scenes, SIZES[family], strict=True)]
    out = tmp_path_factory.mktemp(family)
    config = attention.AttentionConfig(batch_size=2, viewers=1)
    run = RunDir(out, {"t": family}, key=["sample"])
    summary = attention.run(vlm, samples, config, run)
    return vlm, eager, samples, config, run, summary


def test_stored_attention_equals_eager_weights(family_run):
    """Patch maps and masses are those of `output_attentions=True` on an eager copy of the
    model, at the query column of each sample of a left-padded batch."""
    vlm, eager, samples, config, run, summary = family_run
    assert summary["n_images"] == len(samples) == 2
    stored = [attention.load_maps(attention.maps_path(run.path, s.id)) for s in samples]
    batch = vlm.prepare([s.image for s in samples], [m.prompt for m in stored])
    assert (batch.attention_mask == 0).any(), "the batch should be left-padded"
    with torch.no_grad():
        ref = eager.forward(batch, output_attentions=True).attentions  # L x [B, H, S, S]
    tm = batch.token_map
    rows = run.rows()
    for b, (sample, maps) in enumerate(zip(samples, stored, strict=True)):
        valid = np.flatnonzero(batch.attention_mask[b].numpy())
        first, q = int(valid[0]), int(valid[-1])
        patches, newlines = tm.image_positions(b), tm.newline_positions(b)
        assert maps.patch.shape == (vlm.num_layers, 4, len(patches))
        assert (maps.tile == 1).any() == (vlm.model_type == "llava_next")
        assert len(newlines) > 0 if vlm.model_type == "llava_next" else len(newlines) == 0
        text = np.setdiff1d(valid, np.concatenate([patches, newlines, [first]]))
        for layer, w in enumerate(ref):
            row = w[b, :, q].double().numpy()  # [H, S]
            np.testing.assert_allclose(maps.patch[layer].astype(float), row[:, patches],
                                       rtol=2e-3, atol=1e-6)
            image = row[:, patches].sum(-1) + row[:, newlines].sum(-1)
            np.testing.assert_allclose(maps.image_mass[layer], image, atol=1e-5)
            np.testing.assert_allclose(maps.first_mass[layer], row[:, first], atol=1e-5)
            np.testing.assert_allclose(maps.text_mass[layer], row[:, text].sum(-1), atol=1e-5)
            r = next(r for r in rows if r["sample"] == sample.id and r["layer"] == layer)
            total = (np.asarray(r["head_image_mass"]) + np.asarray(r["head_text_mass"])
                     + np.asarray(r["head_first_mass"]))
            np.testing.assert_allclose(total, 1.0, atol=1e-5)  # every key is in one part
            mean = row[:, patches].mean(0)
            obj = maps.on_object
            assert r["object_share"] == pytest.approx(mean[obj].sum() / mean.sum(), rel=1e-3)
            assert r["peak_on_object"] == bool(obj[int(mean.argmax())])
            if vlm.model_type == "llava_next":
                assert r["newline_mass"] > 0  # newline tokens are image-side, never drawn
        assert obj.any() and not obj.all()
        assert maps.query_token and maps.first_token
        np.testing.assert_allclose(maps.box, tm.boxes(patches, b), atol=1e-3)


def test_summary_and_viewer_files(family_run):
    vlm, _, samples, _, run, summary = family_run
    assert summary["n_images"] == 2 and summary["n_layers"] == vlm.num_layers
    assert summary["has_newlines"] == (vlm.model_type == "llava_next")
    for layer in range(vlm.num_layers):
        total = sum(summary["per_layer"][m][layer] for m in attention.MASSES)
        assert total == pytest.approx(1.0, abs=1e-5)
        lo, hi = summary["per_layer_ci95"]["image"][layer]
        assert lo <= summary["per_layer"]["image"][layer] <= hi
    page = (run.path / "viewer" / f"{samples[0].id}.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert page.count('class="patch') == len(attention.load_maps(
        attention.maps_path(run.path, samples[0].id)).tile)
    assert summary["viewer"] == [str(run.path / "viewer" / f"{samples[0].id}.html")]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VLM(build_model(TINY).eval(), build_processor(TINY), "llava", name="tiny")


def test_query_columns(tiny):
    scene = shapesworld.make_scene(1000, 1)
    prompt = "is there a red circle in this image ?"
    batch = tiny.prepare([scene.image, scene.image], [prompt, "is there a circle ?"])
    tokens = tiny.tokenizer.convert_ids_to_tokens(batch.input_ids[1].tolist())
    valid = np.flatnonzero(batch.attention_mask[1].numpy())
    assert valid[0] > 0  # the shorter prompt is padded on the left
    assert attention.query_column(tiny, batch, 1, "last") == batch.seq_len - 1
    assert attention.query_column(tiny, batch, 1, "-2") == batch.seq_len - 2
    assert attention.query_column(tiny, batch, 1, "0") == valid[0]
    col = attention.query_column(tiny, batch, 1, "Circle")
    assert tokens[col] == "circle"
    with pytest.raises(ValueError, match="no token of the prompt"):
        attention.query_column(tiny, batch, 1, "red")
    with pytest.raises(ValueError, match="outside the prompt"):
        attention.query_column(tiny, batch, 1, str(len(valid)))
    with pytest.raises(ValueError, match="several words"):
        attention.parse_query("red circle")


def test_a_word_query_is_the_row_of_that_token(tiny, tmp_path):
    """--query circle stores the attention of the 'circle' token, not the answer's."""
    from vislens.interventions import capture

    sample = shapesworld.make_scene(1000, 0)
    assert [i.name for i in sample.instances] == ["cyan star"]
    config = attention.AttentionConfig(query="star", viewers=0)
    run = RunDir(tmp_path, {}, key=["sample"])
    attention.run(tiny, [sample], config, run)
    batch = tiny.prepare([sample.image], ["is there a cyan star in this image ?"])
    col = attention.query_column(tiny, batch, 0, "star")
    assert col < batch.seq_len - 1
    with capture(tiny, [[]], residual=False, attention_queries=[[col]]) as cap, torch.no_grad():
        tiny.forward(batch)
    maps = attention.load_maps(attention.maps_path(tmp_path, sample.id))
    expected = cap.attention[1][0][:, batch.token_map.image_positions(0)].numpy()
    np.testing.assert_allclose(maps.patch[1].astype(float), expected, rtol=2e-3, atol=1e-6)
    assert maps.query_token == "star" and maps.prompt == "is there a cyan star in this image ?"


def test_interrupted_run_resumes_to_the_same_rows(tiny, tmp_path, monkeypatch):
    samples = shapesworld.generate(3, seed=1000)
    config = attention.AttentionConfig(batch_size=1, viewers=2)
    whole = attention.run(tiny, samples, config, RunDir(tmp_path / "a", {}, key=["sample"]))
    real, calls = attention._chunk_rows, []

    def interrupted(vlm, chunk, cfg, out):
        calls.append([s.id for s, _ in chunk])
        if len(calls) == 2:
            raise KeyboardInterrupt
        yield from real(vlm, chunk, cfg, out)

    monkeypatch.setattr(attention, "_chunk_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attention.run(tiny, samples, config, RunDir(tmp_path / "b", {}, key=["sample"]))
    assert len(RunDir(tmp_path / "b", {}, key=["sample"]).rows()) == tiny.num_layers
    calls.clear()
    monkeypatch.setattr(attention, "_chunk_rows", real)
    counted = []
    monkeypatch.setattr(attention, "_chunk_rows",
                        lambda *a: (counted.append(a[1]), real(*a))[1])
    resumed = attention.run(tiny, samples, config, RunDir(tmp_path / "b", {}, key=["sample"]))
    assert sum(len(c) for c in counted) == whole["n_images"] - 1 > 0
    strip = ("viewers", "viewer")
    assert {k: v for k, v in resumed.items() if k not in strip} == \
        {k: v for k, v in whole.items() if k not in strip}
    for a, b in zip(whole["viewer"], resumed["viewer"], strict=True):
        assert open(a).read() == open(b).read()


def test_bootstrap_columns():
    m = np.array([[1.0, np.nan, 0.0], [1.0, np.nan, 1.0], [1.0, np.nan, 0.5]])
    ci = bootstrap_columns(m, n_boot=500)
    assert ci[0].tolist() == [1.0, 1.0]
    assert np.isnan(ci[1]).all()
    assert 0.0 <= ci[2, 0] < 0.5 < ci[2, 1] <= 1.0
    with pytest.raises(ValueError):
        bootstrap_columns(np.zeros(3))


runner = CliRunner()


@pytest.mark.slow
def test_cli_json_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["attention", "--n", "4", "--viewers", "1", "--out", str(out), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stderr == ""
    summary = json.loads(first.stdout)
    assert summary["n_layers"] == 4 and summary["n_heads"] == 4
    assert summary["query_token"] == "<sep>" and summary["first_token"] == "<s>"
    assert (out / "attention_mass.png").is_file() and (out / "attention_object.png").is_file()
    assert len(list((out / "maps").glob("*.npz"))) == summary["n_images"]
    again = runner.invoke(app, args)
    assert json.loads(again.stdout) == summary  # resumed: nothing recomputed, same numbers


def test_cli_help_and_errors(tmp_path):
    help_text = runner.invoke(app, ["attention", "--help"], terminal_width=200).output
    assert "Example: vislens attention" in help_text and "--json" in help_text
    for bad, words in ((["--query", "red star"], "several words"),
                       (["--setting", "chat"], "unknown setting"),
                       (["--query", "zebra", "--n", "2"], "no token of the prompt"),
                       (["--viewers", "-1"], "--viewers")):
        result = runner.invoke(app, ["attention", *bad, "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        if "zebra" not in bad:  # caught before the model loads: nothing else is printed
            assert len(lines) == 1, result.output
        assert lines[-1].startswith("error:") and words in lines[-1], result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / "bad").exists()
