"""The family seam: every supported family is one declared module; any other
image-text-to-text model loads through the generic fallback (positions only), and the
experiments that need pixels refuse it with one line.

The fallback is exercised on a tiny Gemma 3 with its family module taken out of the
registry: a model type vislens has no module for, whose image tokens sit in the sequence."""

import json

import numpy as np
import pytest
import torch
from helpers_models import save_gemma3
from PIL import Image
from typer.testing import CliRunner

import vislens
from vislens.cli import app
from vislens.interventions import capture, knockout
from vislens.models.families import FAMILIES, Generic, family_for


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return save_gemma3(tmp_path_factory.mktemp("gemma3") / "gemma3")


@pytest.fixture
def unregistered(monkeypatch):
    """Gemma 3 as a model type without a family module."""
    monkeypatch.delitem(FAMILIES, "gemma3")


def test_every_family_is_one_declared_module():
    assert set(FAMILIES) == {"llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen2_vl",
                             "qwen3_vl", "gemma3", "idefics3", "internvl", "mistral3", "paligemma"}
    for name, family in FAMILIES.items():
        assert family.model_type == name and family.geometric and family.model_class
    assert family_for("qwen2_5_vl").mrope and not family_for("llava").mrope
    assert family_for("qwen2_vl").mrope and family_for("qwen3_vl").mrope
    assert not family_for("gemma3").mrope
    assert family_for("qwen3_vl").deepstack and not family_for("qwen2_vl").deepstack
    assert family_for("llava_onevision").multi_image and not family_for("llava").multi_image


def test_unknown_and_cross_attention_models_are_one_line():
    with pytest.raises(ValueError, match="not an image-text-to-text"):
        family_for("bert")
    with pytest.raises(ValueError, match="cross-attention"):
        family_for("mllama")
    assert not isinstance(family_for("gemma3"), Generic)


def test_a_type_without_module_falls_back(unregistered):
    assert isinstance(family_for("gemma3"), Generic)


def test_generic_fallback_runs_position_experiments(gemma3, unregistered):
    vlm = vislens.load(str(gemma3))
    assert isinstance(vlm.family, Generic) and vlm.num_layers == 2
    batch = vlm.prepare([Image.new("RGB", (300, 200), (200, 40, 40)),
                         Image.new("RGB", (90, 120))],
                        ["what", "is there a red circle in this image ?"])
    tm = batch.token_map
    ids = batch.input_ids.numpy()
    for b in range(2):  # every image soft token, and only those, is mapped
        assert np.array_equal(tm.image_positions(b), np.flatnonzero(ids[b] == vlm.image_token_id))
        assert len(tm.image_positions(b)) == 16
    with capture(vlm, [tm.image_positions(b) for b in range(2)], keys=True, values=True) as cap:
        clean = vlm.forward(batch).logits
    assert cap.values[1].shape[0] == 32 and torch.isfinite(cap.keys_post[0]).all()
    question = [np.arange(tm.image_positions(b).max() + 1, batch.seq_len) for b in range(2)]
    with knockout(vlm, [(q, tm.image_positions(b)) for b, q in enumerate(question)]):
        blocked = vlm.forward(batch).logits
    assert not torch.allclose(clean[:, -1], blocked[:, -1])  # the text no longer reads the image
    with pytest.raises(Exception, match="needs an image-token layout.*gemma3"):
        tm.positions(0, np.ones((200, 300), bool))


def test_generic_fallback_info_and_refusal_through_the_cli(gemma3, unregistered, tmp_path):
    runner = CliRunner()
    info = runner.invoke(app, ["info", "--model", str(gemma3), "--json"])
    assert info.exit_code == 0, info.output
    facts = json.loads(info.stdout)
    assert facts["family"] == "gemma3" and "no token layout" in facts["native_image_size"]
    out = tmp_path / "run"
    r = runner.invoke(app, ["perceive", "--model", str(gemma3), "--n", "2", "--tasks", "fg-seg",
                            "--out", str(out)])
    assert r.exit_code == 2 and "needs an image-token layout" in r.output, r.output
    said = [ln for ln in r.output.splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(said) == 1 and said[0].startswith("error:")  # besides the weight-loading bar
    assert not out.exists()
