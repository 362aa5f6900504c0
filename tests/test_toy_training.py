"""Both toy trainers run every stage end to end (tiny sizes, a few steps) and write a
checkpoint the plain Auto classes load; toy-qwen starts from the LLaVA toy's LM."""

from __future__ import annotations

import json

import pytest
import torch

from vislens.toy import qwen
from vislens.toy.build import ToySpec

LM = dict(lm_hidden=48, lm_heads=2, lm_mlp=64, lm_layers=2)


@pytest.fixture(scope="module")
def llava_toy(tmp_path_factory):
    from vislens.toy.train import Recipe, train

    spec = ToySpec(**LM, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=32)
    recipe = Recipe(spec=spec, pool_size=6, images_per_step=2, images_per_step_b=2,
                    steps_a=3, steps_a2=1, steps_b=3, steps_c=3, warmup=1, fresh_every=2,
                    probe_every=2, eval_scenes=2, guide_layer=1)
    out = tmp_path_factory.mktemp("toys") / "llava"
    return out, train(out, seed=0, recipe=recipe, progress=False)


def test_llava_trainer_runs_every_stage_and_saves_a_loadable_model(llava_toy):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, log = llava_toy
    assert {r["stage"] for r in log["steps"]} == {"A", "A2", "B", "C"}
    assert {p["stage"] for p in log["probes"]} == {"A", "A2", "B", "C"}
    assert all("vision" in r for r in log["steps"] if r["stage"] == "C")
    assert set(log["held_out"]["accuracy"]) == {"generative", "polling", "vqa"}
    assert json.loads((out / "training_log.json").read_text())["recipe"]["fresh_every"] == 2
    assert (out / "loss.png").stat().st_size > 0
    assert not list(out.glob("stage_*.pt"))
    model = AutoModelForImageTextToText.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    assert model.config.text_config.hidden_size == 48


def test_qwen_trainer_starts_from_the_llava_lm(llava_toy, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vislens.toy.qwen_train import QwenRecipe, train

    donor, _ = llava_toy
    spec = qwen.QwenToySpec(**LM, mrope_section=(4, 4, 4), vision_hidden=32, vision_mlp=32)
    recipe = QwenRecipe(spec=spec, init_lm=str(donor), pool_size=6, images_per_step=2,
                        images_per_step_b=2, steps_a=0, steps_b=2, steps_c=0, fresh_every=1,
                        probe_every=1, eval_scenes=2, guide_layer=1)
    log = train(tmp_path / "qwen", seed=0, recipe=recipe, progress=False)
    assert {r["stage"] for r in log["steps"]} == {"B"}
    assert log["recipe"]["init_lm"] == str(donor)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "qwen")
    lm = AutoModelForImageTextToText.from_pretrained(donor).model.language_model
    # stage B trains the vision side only, so the transplanted LM layers are untouched
    torch.testing.assert_close(model.model.language_model.layers[1].mlp.down_proj.weight,
                               lm.layers[1].mlp.down_proj.weight)


def test_resume_runs_only_the_stages_not_done(tmp_path):
    from vislens.toy.stages import OracleHead, save_stage_state
    from vislens.toy.train import Recipe, build_model, train

    spec = ToySpec(**LM, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=32)
    state = tmp_path / "stage_B.pt"
    save_stage_state(state, build_model(spec, seed=5), OracleHead(48), {"A", "A2", "B"})
    recipe = Recipe(spec=spec, pool_size=6, images_per_step=2, images_per_step_b=2,
                    steps_a=3, steps_a2=1, steps_b=3, steps_c=2, warmup=1, fresh_every=2,
                    probe_every=2, eval_scenes=2, guide_layer=1)
    log = train(tmp_path / "out", seed=0, recipe=recipe, progress=False, resume=state)
    assert {r["stage"] for r in log["steps"]} == {"C"}
