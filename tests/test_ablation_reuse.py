"""Ablation computes only what a condition changes, and gets today's verdicts.

The reference here is the plain path (`reference_rows`): per setting a clean + noised
`vlm.generate`, every condition one `vlm.generate` under `ablate`, integrated gradients
on full forwards, all to the full token budget. The shared path (settings sharing the
image prefix, conditions starting at their first ablated token, rows leaving once their
verdict is settled) must give the same verdicts on the toys and on the answer-fitted
look-alikes, and a deliberately wrong shortcut must be caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vislens
from vislens.data import answers, shapesworld
from vislens.data.samples import Question
from vislens.experiments import ablation, decoding
from vislens.experiments.batching import cut_batch, extend_batch, repeat_batch
from vislens.experiments.prompts import asked, question
from vislens.experiments.selection import choose_targets, noise_object
from vislens.interventions import ablate
from vislens.interventions.continuation import advance, embed, record, refused
from vislens.runs.rundir import RunDir


# ---- the settled rules --------------------------------------------------------------------------
def _continuations(text: str) -> list[str]:
    return [text + s for s in ("", " bus", "bus", " giraffe", "giraffe", "s", " cat.", ".",
                               "n't", " and a giraffe", " traffic light", "ly", " no", "es")]


POLLING = Question("polling", "", "yes")
VQA = Question("vqa", "", "giraffe", answer_prefix="It is")
CAPTION = Question("generative", "", "giraffe", target_name="giraffe")


@pytest.mark.parametrize("q, text, settled", [
    (POLLING, "Yes", False),  # "Yesterday" is not yes
    (POLLING, "yes", False),
    (POLLING, "Yes,", True),
    (POLLING, "Yes ", True),
    (POLLING, "No.", True),
    (POLLING, "yesterday", False),
    (POLLING, "", False),
    (POLLING, "**", False),
    (VQA, "a giraffe", False),  # "a giraffe bus" names a bus
    (VQA, "a gir", False),
    (VQA, "a giraffe.", True),
    (VQA, "a cat.", True),
    (VQA, "a cat", False),
    (VQA, "It is a cat, or", True),
    (CAPTION, "A giraffe", False),
    (CAPTION, "A giraffe bus", False),  # one object, named bus
    (CAPTION, "A giraffe bus.", False),  # wrong: a later sentence may name a giraffe
    (CAPTION, "It is a cat.", False),
    (CAPTION, "A giraffe.", True),
    (CAPTION, "A giraffe, a bus", True),
    (CAPTION, "A giraffe and", False),
    (CAPTION, "A giraffe and a cat.", True),
])
def test_settled_rules_hold_for_every_continuation(q, text, settled):
    assert q.settled(text) is settled
    if settled:
        verdict = q.is_correct(text)
        for longer in _continuations(text):
            assert q.is_correct(longer) == verdict, longer


def test_naive_rules_would_be_wrong():
    """What the rules guard against: each naive stop flips on some continuation."""
    assert answers.first_word("Yes", "yes") and not answers.first_word("Yesterday", "yes")
    assert answers.mentions("A giraffe", "giraffe") and not answers.mentions("A giraffe bus",
                                                                             "giraffe")
    assert answers.starts_with("a giraffe", "giraffe") and \
        not answers.starts_with("a giraffe bus", "giraffe")
    assert not answers.mentions("It is a cat.", "giraffe") and \
        answers.mentions("It is a cat. A giraffe", "giraffe")


def test_settled_rules_on_random_texts():
    """Every settled prefix of random word strings keeps its verdict to the end."""
    rng = np.random.default_rng(0)
    vocab = ["a", "giraffe", "bus", "cat", "yes", "no", ".", ",", " ", "traffic", "light",
             "Yes", "gir", "affe", "!", "and", "It", "is"]
    for _ in range(400):
        full = "".join(rng.choice(vocab, size=8))
        for q in (POLLING, VQA, CAPTION):
            for k in range(len(full) + 1):
                if q.settled(full[:k]):
                    assert q.is_correct(full) == q.is_correct(full[:k]), (q.setting, full, k)


def test_stable_text_keeps_what_later_tokens_cannot_change():
    class Clean:
        clean_up_tokenization_spaces = True

    class Plain:
        clean_up_tokenization_spaces = False

    assert decoding.stable_text(Plain(), "Yes\ufffd") == "Yes"
    assert decoding.stable_text(Plain(), "Yes ") == "Yes "
    assert decoding.stable_text(Clean(), "Yes n") == "Yes"  # " n't" would join it: "Yesn't"
    assert not POLLING.settled(decoding.stable_text(Clean(), "Yes n"))
    assert POLLING.settled(decoding.stable_text(Clean(), "Yes, n"))


# ---- the reference: today's path ----------------------------------------------------------------
def reference_rows(vlm, samples, targets, config, vector) -> dict:
    """(sample, setting, condition) -> row, computed the plain way (see the module doc)."""
    out = {}
    for idx, (sample, target) in enumerate(zip(samples, targets, strict=True)):
        if target is None:
            continue
        inst = sample.instances[target]
        cache = {}

        def ig(sample=sample, target=target, cache=cache):
            if "s" not in cache:
                q = question(sample, target, "polling")
                one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
                feats = vlm.image_embeddings(one)
                gen = vlm.generate(one, max_new_tokens=config.max_new_tokens["polling"],
                                   image_features=feats)
                prefix, tid = ablation.yes_token(vlm, one, vlm.trim(gen[0]), q)
                cache["s"] = ablation.integrated_gradients(
                    vlm, extend_batch(one, prefix), feats, tid, vector, config.ig_steps,
                    config.ig_batch, None, sign=config.ig_sign)
            return cache["s"]

        for setting in config.settings:
            q = asked(vlm, sample, target, setting)
            key = (sample.id, setting)
            if q is None:
                out[(*key, "clean")] = {"correct": False, "kept": False, "text": ""}
                continue
            noised = noise_object(sample.image, inst.mask, seed=config.seed + idx)
            batch = vlm.prepare([sample.image, noised], [q.prompt] * 2,
                                [q.answer_prefix or None] * 2)
            max_new = config.max_new_tokens[setting]
            gen = vlm.generate(batch, max_new_tokens=max_new)
            texts = vlm.decode(gen)
            ok = [q.is_correct(t) for t in texts]
            kept = ok[0] and not ok[1]
            for name, t, c in (("clean", texts[0], ok[0]), ("noised", texts[1], ok[1])):
                out[(*key, name)] = {"correct": c, "kept": kept, "text": t}
            if not kept:
                continue
            one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
            feats = vlm.image_embeddings(one)
            sets = ablation.token_sets(vlm, one, feats, inst.mask, config, idx, q, vector,
                                       vlm.trim(gen[0]), None, ig)
            names = [n for n in config.condition_names(len(one.token_map)) if n in sets]
            with ablate(vlm, [sets[n] for n in names], vector):
                g = vlm.generate(repeat_batch(one, len(names)), max_new_tokens=max_new,
                                 image_features=feats * len(names))
            for name, t in zip(names, vlm.decode(g), strict=True):
                out[(*key, name)] = {"correct": q.is_correct(t), "kept": True, "text": t,
                                     "n_tokens": len(sets[name])}
    return out


def compare(vlm, samples, config, vector, tmp_path, expect_shared=True):
    targets = choose_targets(samples, config.area)
    ref = reference_rows(vlm, samples, targets, config, vector)
    out = RunDir(tmp_path / "run", {"t": 1}, key=["sample", "setting", "condition"])
    for idx, (sample, target) in enumerate(zip(samples, targets, strict=True)):
        if target is not None:
            ablation._unit(vlm, out, (idx, sample, target), vector, None, config)
    got = {(r["sample"], r["setting"], r["condition"]): r for r in out.rows()}
    assert set(got) == set(ref)
    conditions = 0
    for key, r in ref.items():
        g = got[key]
        assert (g["correct"], g["kept"]) == (r["correct"], r["kept"]), (key, g["text"],
                                                                      r["text"])
        if key[2] in ("clean", "noised"):
            assert g["text"] == r["text"], key  # funnel rows: today's text
        else:
            conditions += 1
            assert g["n_tokens"] == r["n_tokens"], key
            if not getattr(vlm.tokenizer, "clean_up_tokenization_spaces", False):
                assert r["text"].startswith(g["text"]), key  # where it stopped early
    assert conditions > 0
    shared = not refused(vlm)
    assert shared == expect_shared
    return got, ref


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy", "toy-qwen"])
def test_toys_give_todays_verdicts(name, tmp_path):
    vlm = vislens.load(name)
    samples = shapesworld.generate(3, seed=1000)
    config = ablation.AblationConfig(ig_steps=2, area=(0.0, 350.0))
    vector = torch.randn(vlm.language_model.config.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    compare(vlm, samples, config, vector, tmp_path)
    compare(vlm, samples, ablation.AblationConfig(ig_steps=2, area=(0.0, 350.0),
                                                  ig_prompt="own", settings=("vqa",)),
            "zeros", tmp_path / "own")


LOOKALIKES = ["llava-1.5-7b-hf", "llama3-llava-next-8b-hf", "Qwen2.5-VL-7B-Instruct"]
LLAVA15 = pytest.param("llava-1.5-7b-hf", marks=pytest.mark.lookalike)
QWEN25VL = pytest.param("Qwen2.5-VL-7B-Instruct", marks=[pytest.mark.lookalike, pytest.mark.slow])


@pytest.fixture(scope="module")
def lookalike():
    from answer_head import fitted_dir

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = vislens.load(str(fitted_dir(name)))
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.lookalike
@pytest.mark.parametrize("name", LOOKALIKES)
def test_lookalikes_give_todays_verdicts(name, lookalike, tmp_path):
    from answer_head import scenes

    vlm = lookalike(name)
    samples = scenes()[:2]
    config = ablation.AblationConfig(ig_steps=2, random_ks=(5, 40))
    feats = vlm.image_embeddings(vlm.prepare([samples[-1].image], ["x"]))
    got, _ = compare(vlm, samples, config, feats[0].mean(0), tmp_path)
    assert any(r["kept"] for r in got.values())


# ---- exactness of the pieces, and a wrong shortcut caught ---------------------------------------
def _prefix_and_reference(vlm, sample, sets, vector):
    q = question(sample, 0, "vqa")
    one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
    feats = vlm.image_embeddings(one)
    ids = one.input_ids[0].cpu().numpy()
    p = int(np.flatnonzero(ids == vlm.image_token_id).max()) + 1
    clean = record(vlm, cut_batch(one, p), feats)
    with torch.no_grad(), ablate(vlm, sets, vector):
        want = vlm.forward(repeat_batch(one, len(sets)), image_features=feats * len(sets),
                           logits_to_keep=1).logits[:, -1]
    return one, clean, p, want


def _continued(vlm, one, clean, p, sets, vector):
    rows = ablation.ablated_prefix(vlm, clean, sets, vector)
    with torch.no_grad():
        tail = embed(vlm, one.input_ids[:1, p:]).expand(len(sets), -1, -1)
        return advance(vlm, rows, tail)[:, -1]


@pytest.mark.parametrize("name", ["toy", "toy-qwen", LLAVA15])
def test_ablating_embeddings_from_the_first_token_equals_ablate(name, lookalike):
    """The conditions' path equals `ablate` + a full forward; starting one token late (the
    first ablated token taken as clean) does not, and this comparison sees it."""
    if name.startswith("toy"):
        vlm = vislens.load(name)
        sample = shapesworld.generate(1, seed=1000)[0]
    else:
        from answer_head import scenes

        vlm = lookalike(name)
        sample = scenes()[0]
    tm = vlm.prepare([sample.image], ["x"]).token_map
    image = tm.image_positions(0)
    rng = np.random.default_rng(1)
    sets = [image[:3], np.sort(rng.choice(image, 20, replace=False)), image[5:], image[:0],
            image[-4:]]
    vector = torch.randn(vlm.language_model.config.hidden_size,
                         generator=torch.Generator().manual_seed(1))
    one, clean, p, want = _prefix_and_reference(vlm, sample, sets, vector)
    got = _continued(vlm, one, clean, p, sets, vector)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    late = _continued(vlm, one, clean, p, [s[1:] for s in sets], vector)  # the wrong shortcut
    off = (late - want).abs().amax(-1)
    assert float(off[0]) > 1e-3 * scale and float(off[2]) > 1e-3 * scale


@pytest.mark.parametrize("name", ["toy", LLAVA15, QWEN25VL])
def test_ig_from_the_recorded_prefix_equals_full_forwards(name, lookalike):
    if name.startswith("toy"):
        vlm = vislens.load(name)
        sample = shapesworld.generate(1, seed=1000)[0]
    else:
        from answer_head import scenes

        vlm = lookalike(name)
        sample = scenes()[0]
    q = question(sample, 0, "polling")
    one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
    feats = vlm.image_embeddings(one)
    ids = one.input_ids[0].cpu().numpy()
    p = int(np.flatnonzero(ids == vlm.image_token_id).max()) + 2
    clean = record(vlm, cut_batch(one, p), feats)
    ext = extend_batch(one, torch.tensor([int(ids[-1])]))  # a generated token after the prompt
    vector = feats[0].mean(0)
    for sign in ("dims", "abs"):
        want = ablation.integrated_gradients(vlm, ext, feats, 5, vector, 4, 3, sign=sign)
        got = ablation.integrated_gradients(vlm, ext, feats, 5, vector, 4, 3, sign=sign,
                                            recorded=clean)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * np.abs(want).max())


@pytest.mark.slow
@pytest.mark.lookalike
def test_a_family_whose_positions_see_later_ones_falls_back(lookalike, tmp_path):
    """Gemma 3's image block attends both ways: its recorded pass cannot be continued, so
    the plain path runs, with today's verdicts."""
    from answer_head import scenes
    from lookalikes import GEMMA3

    vlm = lookalike(GEMMA3)
    samples = scenes()[:1]
    config = ablation.AblationConfig(ig_steps=2, random_ks=(5,), settings=("polling", "vqa"))
    compare(vlm, samples, config, "zeros", tmp_path, expect_shared=False)
    assert refused(vlm)  # says why


def test_ig_steps_per_pass_follow_the_memory_budget(monkeypatch):
    """0 = as many steps per pass as half the free GPU memory holds; 8 on the CPU."""
    vlm = vislens.load("toy")
    assert ablation.steps_per_pass(vlm, 155, 50) == ablation.CPU_STEPS_PER_PASS
    assert ablation.steps_per_pass(vlm, 155, 3) == 3
    config = vlm.language_model.config
    per_step = 155 * (10 * config.hidden_size + 3 * config.intermediate_size) * \
        vlm.num_layers * 4
    monkeypatch.setattr(type(vlm), "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * per_step, 10**12))
    assert ablation.steps_per_pass(vlm, 155, 50) == 10
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (per_step // 4, 10**12))
    assert ablation.steps_per_pass(vlm, 155, 50) == 1  # never 0: one step per pass at least
    with pytest.raises(ValueError, match="ig-batch"):
        ablation.AblationConfig(ig_batch=-1).validate()
