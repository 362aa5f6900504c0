"""A1 ablation internals against Neo et al.'s protocol (docs/sources/PROTOCOLS.md,
docs/PROTOCOL.md): register threshold, the mean vector's reference set, integrated gradients
as Neo ran them (the answer checks: test_answers_protocol.py). Each test failed on the
code before its fix."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vislens
from vislens.data import shapesworld
from vislens.errors import VislensError
from vislens.experiments import ablation
from vislens.experiments.prompts import question
from vislens.interventions.reference import overlap
from vislens.models.vlm import VLM
from vislens.runs.rundir import RunDir
from vislens.toy.build import build_model, build_processor

ROOT = Path(__file__).resolve().parents[1]
# sample std 0.2667 -> threshold 2.303; population std 0.2514 -> 2.270: 2.3 is a register
# token only under numpy's default (ddof 0), not under torch.std (ddof 1) as Neo et al. ran
NORMS = np.array([1.4, 1.8, 1.6, 2.0, 1.4, 1.6, 1.6, 1.8, 2.3])


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return VLM(build_model(seed=3).eval(), build_processor(), "llava", name="untrained")


@pytest.fixture(scope="module")
def toy():
    return vislens.load("toy")


# ---- 1. register tokens -----------------------------------------------------------------------
def test_register_threshold_is_torch_std_with_ddof_1():
    t = torch.tensor(NORMS)
    torch_flags = (t > t.mean() + 2 * t.std()).numpy()  # Neo et al., src/utils.py:17-19
    assert not torch_flags.any()
    assert (NORMS > NORMS.mean() + 2 * NORMS.std()).any()  # numpy's default would flag 2.3
    image = np.arange(len(NORMS)) + 40
    assert list(ablation.register_tokens(image, NORMS)) == list(image[torch_flags])


def test_token_sets_take_registers_with_the_sample_std(untrained, monkeypatch):
    """Through token_sets: one token between the two thresholds is not a register token."""
    sample = shapesworld.generate(1, seed=11)[0]
    q = question(sample, 0, "polling")
    one = untrained.prepare([sample.image], [q.prompt])
    feats = untrained.image_embeddings(one)
    n = len(one.token_map.image_positions(0))
    base = np.random.default_rng(0).uniform(1.0, 2.0, n - 1)
    for x in np.linspace(2.0, 4.0, 2001):  # a norm only the population std flags
        norms = np.append(base, x)
        if x > norms.mean() + 2 * norms.std() and x <= norms.mean() + 2 * norms.std(ddof=1):
            break
    else:
        pytest.fail("no norm between the two thresholds")
    rows = torch.zeros(n, 4)
    rows[:, 0] = torch.tensor(norms)
    monkeypatch.setattr(ablation, "_patch_features", lambda *a: rows)
    cfg = ablation.AblationConfig(conditions=("register",))
    sets = ablation.token_sets(untrained, one, feats, sample.instances[0].mask, cfg, 0, q,
                               "zeros", [])
    image = one.token_map.image_positions(0)
    assert image[-1] not in set(sets["register"])
    t = torch.tensor(norms)
    assert set(sets["register"]) == set(image[(t > t.mean() + 2 * t.std()).numpy()])


# ---- 2. the mean vector's reference set ------------------------------------------------------
def test_default_reference_is_a_disjoint_held_out_world():
    samples = shapesworld.generate(3, seed=1000)
    assert ablation.default_reference(samples) == "shapesworld:1001"
    cfg = ablation.AblationConfig()
    images, record = ablation.resolve_reference(samples, cfg)
    assert record == {"spec": "shapesworld:1001", "n_images": ablation.REFERENCE_N,
                      "default": True, "overlap": 0, "disjoint": True}
    assert len(images) == ablation.REFERENCE_N
    # the evaluated images are never the reference, even where they are the next world's
    mixed = shapesworld.generate(2, seed=1000) + shapesworld.generate(2, seed=1001)
    assert ablation.default_reference(mixed) == "shapesworld:1002"
    assert ablation.resolve_reference(samples, ablation.AblationConfig(vector="zeros")) == \
        (None, None)


def test_other_data_must_name_its_reference_and_overlap_is_recorded(tmp_path):
    samples = shapesworld.generate(3, seed=1000)
    for s in samples:
        s.meta = {"source": "coco"}
    with pytest.raises(VislensError, match="--reference"):
        ablation.resolve_reference(samples, ablation.AblationConfig())
    # an explicit reference is used as given, and the record says it is not disjoint
    _, record = ablation.resolve_reference(samples, ablation.AblationConfig(),
                                           given=[s.image for s in samples[:2]])
    assert record["overlap"] == 2 and record["disjoint"] is False and not record["default"]
    folder = tmp_path / "val"
    folder.mkdir()
    samples[0].image.save(folder / "a.png")
    Image.new("RGB", samples[1].image.size, (1, 2, 3)).save(folder / "b.png")  # same size
    Image.new("RGB", (17, 9), (1, 2, 3)).save(folder / "c.png")
    _, record = ablation.resolve_reference(
        samples, ablation.AblationConfig(reference=f"imagenet:{folder}"))
    assert record == {"spec": f"imagenet:{folder}", "n_images": 3, "default": False,
                      "overlap": 1, "disjoint": False}
    assert overlap([samples[2].image], [s.image for s in samples[:2]]) == (0, 1)


# ---- 3. integrated gradients ----------------------------------------------------------------
def test_abs_ranking_sums_absolute_attributions_over_hidden_dims(untrained):
    """Neo et al.'s score: |IG| summed over hidden dims (ablation_experiment.py:74). On the
    same run the signed scores still add up to the logit difference (completeness)."""
    sample = shapesworld.generate(2, seed=11)[1]
    one = untrained.prepare([sample.image], ["is there a red circle in this image ?"])
    feats = untrained.image_embeddings(one)
    vec = feats[0].mean(0)
    dims = ablation.integrated_gradients(untrained, one, feats, 5, vec, steps=8, sign="dims")
    signed = ablation.integrated_gradients(untrained, one, feats, 5, vec, steps=8)
    absolute = ablation.integrated_gradients(untrained, one, feats, 5, vec, steps=8, sign="abs")
    assert dims.shape == (144, feats[0].shape[-1])
    np.testing.assert_allclose(signed, dims.sum(-1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(absolute, np.abs(dims).sum(-1), rtol=1e-4, atol=1e-6)
    assert (absolute >= np.abs(signed) - 1e-6).all()
    # a token whose dimensions pull hard both ways: top under abs, last under signed
    crafted = np.array([[5.0, -5.0], [1.0, 1.0], [0.5, 0.0]])
    assert ablation.token_scores(crafted, "abs").argmax() == 0
    assert ablation.token_scores(crafted, "signed").argmin() == 0


def test_ig_defaults_are_neos(untrained):
    cfg = ablation.AblationConfig()
    assert (cfg.ig_steps, cfg.ig_sign, cfg.ig_prompt, cfg.reference) == (50, "abs", "polling", "")
    for bad in ({"ig_sign": "both"}, {"ig_prompt": "caption"}):
        with pytest.raises(ValueError, match="--ig-"):
            ablation.AblationConfig(**bad).validate()


@pytest.mark.slow
def test_ig_runs_once_per_image_on_the_polling_prompt_for_every_setting(toy, tmp_path,
                                                                        monkeypatch):
    """One IG per kept image, on the polling question, explaining "yes" (never BOS), its
    ranking shared by the generative, polling and VQA settings."""
    monkeypatch.setenv("VISLENS_CACHE", str(tmp_path / "cache"))
    calls = []
    real = ablation.integrated_gradients

    def spy(vlm, batch, feats, target_id, *a, **k):
        calls.append((batch.texts, vlm.tokenizer.decode([target_id]).strip().lower(),
                      k.get("sign")))
        return real(vlm, batch, feats, target_id, *a, **k)

    monkeypatch.setattr(ablation, "integrated_gradients", spy)
    samples = shapesworld.generate(3, seed=1000)
    cfg = ablation.AblationConfig(conditions=("ig-matched",), ig_steps=2, area=(0.0, 350.0))
    out = RunDir(tmp_path / "run", {"t": 1}, key=["sample", "setting", "condition"])
    summary = ablation.run(toy, samples, cfg, out)
    kept = {r["sample"] for r in out.rows() if r["kept"]}
    assert kept and len(calls) == len(kept)
    assert sum(summary["n_kept"].values()) > len(kept)  # shared by more than one setting
    for texts, word, sign in calls:
        assert "is there a" in " ".join(texts) and word == "yes" and sign == "abs"
    assert summary["reference"]["spec"] == "shapesworld:1001"
    assert summary["reference"]["disjoint"] is True
    # the labelled variant: each setting's own prompt, one IG per kept (image, setting)
    calls.clear()
    cfg = ablation.AblationConfig(settings=("vqa",), conditions=("ig-matched",), ig_steps=2,
                                  area=(0.0, 350.0), ig_prompt="own")
    out = RunDir(tmp_path / "own", {"t": 2}, key=["sample", "setting", "condition"])
    summary = ablation.run(toy, samples, cfg, out)
    assert len(calls) == summary["n_kept"]["vqa"] > 0
    assert all("shape" in " ".join(texts) for texts, _, _ in calls)


def test_cli_ig_options(tmp_path):
    from typer.testing import CliRunner

    from vislens.cli import app

    out = tmp_path / "run"
    for option, bad in (("--ig-sign", "both"), ("--ig-prompt", "caption")):
        result = CliRunner().invoke(app, ["ablate", option, bad, "--n", "2", "--out", str(out)])
        assert result.exit_code != 0 and option in result.output and not out.exists()
    help_text = CliRunner().invoke(app, ["ablate", "--help"]).output
    assert all(o in help_text for o in ("--ig-steps", "--ig-sign", "--ig-prompt", "--reference"))
