"""Every experiment, `eval` and `study` on the four look-alike checkpoints, proving each path ran.

Random weights almost never answer right, so a run on them keeps no sample and
its conditions never execute. The fixtures here (answer_head.py) are the
look-alikes with ONLY their unembedding fitted, so that greedy decoding answers
the test scenes right when the target is visible and wrong when its pixels are
noised; everything else is the random model. The scenes are 640x480, 560x420
and 384x288 COCO-format images whose targets have multi-piece names
("gir|af|fe"), so the experiments run on 576-2929-token sequences of the real
geometries. Part-B commands read ShapesWorld task data plus native-format
fixtures (Pascal VOC masks, a BLINK parquet). Sizes are the smallest that still
exercise every path: this module is about what runs, not about the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from answer_head import (
    LENS_NAMES,
    TARGETS,
    answer,
    continuation_ids,
    fitted_dir,
    lens_scenes,
    mc_answer,
    mc_items,
    scenes,
)
from e2e import cli, rows_of
from lookalikes import LLAVA15, NEXT, ONEVISION, QWEN25VL
from lookalikes import PAPER as NAMES
from PIL import Image

import vislens
from vislens.data.voc import VOC_CLASSES
from vislens.experiments import knockout, logit_lens, prompts
from vislens.experiments.accuracy import generate_answers
from vislens.experiments.batching import repeat_batch
from vislens.experiments.perception import surface
from vislens.experiments.perception.features import ALL_SOURCES, extract
from vislens.experiments.perception.surface import parse_choice
from vislens.experiments.selection import noise_object
from vislens.interventions import ablate, capture, mean_image_embedding
from vislens.interventions import knockout as knock
from vislens.interventions.knockout import Knockout

SETTINGS = ("generative", "polling", "vqa")
CONDITIONS = ("object", "object+1", "object+2", "register", "random-matched", "ig-matched",
              "all-but-object+1", "random-40")
# image tokens of a 640x480 scene: patches, and all image-token ids with NeXT / OneVision's
# row newlines (the fact sheet's 576 / 2340 / 2929 / 391)
PATCHES_640x480 = {LLAVA15: 576, NEXT: 2304, ONEVISION: 2889, QWEN25VL: 391}
SEQUENCE_IMAGE_TOKENS_640x480 = {LLAVA15: 576, NEXT: 2340, ONEVISION: 2929, QWEN25VL: 391}
TASKS = ("fg-seg", "co-seg", "sem-seg", "ref-seg", "sem-corr", "temp-corr")
TEXT_TASKS = ("sem-seg", "ref-seg")


@dataclass
class Fitted:
    name: str
    path: Path
    vlm: object


@pytest.fixture(scope="session", params=NAMES)
def fitted(request):
    """Each look-alike with its fitted unembedding: name, directory, loaded VLM."""
    path = fitted_dir(request.param)
    return Fitted(request.param, path, vislens.load(str(path)))


def word_starts(tokenizer, name: str) -> set[int]:
    """The ids that begin each word of `name`, read from the tokenizer's offsets when the
    name is written in a sentence or opens the text: what a model emits for the word."""
    ids = set()
    for text, at in ((f"It is a {name}", len("It is a ")), (name, 0)):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts, pos = set(), at
        for word in name.split():
            starts.add(pos)
            pos += len(word) + 1
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if text[a:b].strip() and any(a <= s < b for s in starts):
                ids.add(int(tok))
    return ids


# ---- the construction -------------------------------------------------------------------------
def test_fitted_fixtures_answer_right_clean_and_wrong_noised(fitted):
    """The construction works: eval's own generator (left-padded batches) says the target on
    every clean scene and misses it on every noised one, in all three settings."""
    vlm = fitted.vlm
    images, questions, expected = [], [], []
    for idx, sample in enumerate(scenes()):
        noised = noise_object(sample.image, sample.instances[0].mask, seed=idx)
        for setting in SETTINGS:
            q = prompts.question(sample, 0, setting)
            for image, is_noised in ((sample.image, False), (noised, True)):
                images.append(image)
                questions.append(q)
                expected.append((setting, is_noised, answer(sample, setting, is_noised)))
    texts = generate_answers(vlm.model, vlm.processor, images, questions,
                             max_new_tokens=prompts.MAX_NEW_TOKENS["generative"])
    for text, q, (setting, is_noised, said) in zip(texts, questions, expected, strict=True):
        assert q.is_correct(text) != is_noised, (fitted.name, setting, is_noised, text)
        assert text.strip() == said, (fitted.name, setting, text)  # and nothing after the EOS


def lens_word_starts(tokenizer, name: str) -> set[int]:
    """What the lens counts for a class: the starts of its head words (name's and listed
    synonyms', plurals included), each written alone and in a sentence."""
    from vislens.data.answers import head_words

    return set().union(*(word_starts(tokenizer, w) for w in head_words(name)))


def test_class_word_ids_are_the_pieces_a_word_starts_with(fitted):
    """The lens counts a hit when a top-k token starts a head word of the class. A
    SentencePiece tokenizer writes " giraffe" as "▁" + "▁g|ir|af|fe": the bare "▁" starts
    no word, and taking it would make every "▁" in a top-5 a hit for every class."""
    tok = fitted.vlm.tokenizer
    for cls in (*TARGETS, *LENS_NAMES):
        got = set(logit_lens.word_ids(tok, cls))
        assert got == lens_word_starts(tok, cls), (fitted.name, cls)
        for i in got:
            assert tok.decode([i]).strip(), (fitted.name, cls, i)


# ---- Neo et al. -------------------------------------------------------------------------------
def test_ablate_keeps_samples_and_runs_every_condition(fitted, data, tmp_path):
    """Noise filter, every condition (integrated gradients included) on the real geometry."""
    out = tmp_path / "ablate"
    s = cli("ablate", "--model", fitted.path, "--data", f"coco:{data['coco']}", "--n", 1,
            "--ig-steps", 2, "--conditions", ",".join(CONDITIONS),
            "--reference", f"imagenet:{data['imagenet']}", "--out", out)
    assert s["n_kept"] == {k: 1 for k in SETTINGS}, s["n_kept"]
    rows = rows_of(out)
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        (clean,) = [r for r in mine if r["condition"] == "clean"]
        (noised,) = [r for r in mine if r["condition"] == "noised"]
        assert clean["correct"] and not noised["correct"] and clean["kept"] and noised["kept"]
        tokens = {r["condition"]: r["n_tokens"] for r in mine
                  if r["condition"] not in ("clean", "noised")}
        assert set(tokens) == set(CONDITIONS) == set(s["drop"][setting])
        assert 0 < tokens["object"] <= tokens["object+1"] <= tokens["object+2"]
        assert tokens["ig-matched"] == tokens["random-matched"] == tokens["object+1"]
        assert tokens["random-40"] == 40
        # every patch token of the 640x480 scene is either object+1 or the rest
        assert tokens["all-but-object+1"] + tokens["object+1"] == PATCHES_640x480[fitted.name]


def test_logit_lens_decodes_every_image_token_batched_as_alone(fitted, data, tmp_path,
                                                               monkeypatch):
    """Rows for every patch token x layer of two images decoded in one left-padded batch,
    in bounded slices of the vocabulary-wide softmax; a sample of positions decoded alone
    gives the same top-k, the model's own argmax at the last layer, and the fitted
    object patches are found as hits of their multi-piece class name."""
    vlm, out = fitted.vlm, tmp_path / "lens"
    vocab, widest = vlm.lm_head.weight.shape[0], []
    softmax = torch.softmax

    def watched(x, *args, **kwargs):
        if x.shape[-1] == vocab:
            widest.append(x.numel())
        return softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", watched)
    s = cli("logit-lens", "--model", fitted.path, "--data", f"coco:{data['lens']}",
            "--viewers", 2, "--out", out)
    monkeypatch.undo()
    assert widest and max(widest) <= logit_lens.MAX_LOGITS
    last = vlm.num_layers
    assert s["n_images"] == 2 and s["n_layers"] == last + 1 and len(s["viewer"]) == 2
    tokens = rows_of(out)
    for sample in lens_scenes():
        alone = vlm.prepare([sample.image], [logit_lens.PROMPT])
        tm = alone.token_map
        # one stored row per patch token, each with a list entry per layer
        assert sum(r["sample"] == sample.id for r in tokens) == len(tm)
        mine = [{**r, "layer": layer, "topk_ids": r["topk_ids"][layer],
                 "topk_probs": r["topk_probs"][layer], "hit": r["hit"][layer]}
                for r in tokens if r["sample"] == sample.id for layer in range(last + 1)]
        assert all(len(r["class_prob"]) == last + 1 for r in tokens)
        if sample.image.size == (640, 480):
            assert len(tm) == PATCHES_640x480[fitted.name]
        starts = lens_word_starts(vlm.tokenizer, sample.instances[0].name)
        for r in mine:
            assert r["hit"] == bool(starts & set(r["topk_ids"]))
        by_cell = {(r["tile"], r["row"], r["col"], r["layer"]): r for r in mine}
        image = tm.image_positions(0)
        _, cover = tm.coverage(0, sample.instances[0].mask)
        picked = np.unique(np.concatenate([image[:: max(1, len(image) // 24)],
                                           image[cover >= 0.5][:8]]))
        cells = tm.cells(picked, 0)
        with torch.no_grad(), capture(vlm, [picked]) as cap:
            own = vlm.forward(alone, logits_to_keep=torch.as_tensor(picked)).logits[0]
        for layer in range(last + 1):
            with torch.no_grad():
                ids, probs, _, _ = logit_lens._decode(vlm, cap.residual[layer],
                                                     torch.tensor(sorted(starts)), 5)
                scale = float(vlm.unembed(cap.residual[layer]).abs().max())
            batched = [by_cell[(*map(int, c), layer)] for c in cells]
            for r, want, p in zip(batched, ids.tolist(), probs, strict=True):
                # ranks may swap only between near-ties (the fitted rows are large: logits
                # agree to ~1e-6 of their scale), or at the k-th place with the (k+1)-th
                for j in np.flatnonzero(np.asarray(r["topk_ids"]) != np.asarray(want)):
                    others = np.delete(p, j)
                    assert j == len(want) - 1 or np.isclose(others, p[j], rtol=1e-4,
                                                            atol=0).any(), (r, want, p)
            # log-probabilities move with the logits, which agree to ~1e-6 of their scale
            # (hundreds to thousands on the fitted rows); below 1e-30 float32 rounds to zero
            got = np.asarray([r["topk_probs"] for r in batched])
            tiny = (got < 1e-30) | (probs < 1e-30)
            assert (np.maximum(got, probs)[tiny] < 1e-20).all()
            np.testing.assert_allclose(np.log(got[~tiny]), np.log(probs[~tiny]), rtol=0,
                                       atol=1e-5 * scale)
        assert [by_cell[(*map(int, c), last)]["topk_ids"][0] for c in cells] == \
            own.argmax(-1).tolist()
        hits = [r for r in mine if r["layer"] == last and r["hit"] and r["coverage"] >= 0.5]
        assert len(hits) >= 8, (fitted.name, sample.id, len(hits))  # the fitted patches
    assert s["hit_rate"] > 0 and s["per_layer"][last] > 0


def test_knockout_windows_judge_every_answer_token(fitted, data, tmp_path):
    """Every condition x window on a kept sample; the multi-piece VQA answer is judged on all
    its pieces, which greedy decoding under the same knockout confirms, window by window."""
    vlm, out = fitted.vlm, tmp_path / "knockout"
    s = cli("knockout", "--model", fitted.path, "--data", f"coco:{data['coco']}", "--n", 1,
            "--out", out)
    assert s["n_kept"] == {"polling": 1, "vqa": 1}
    windows = s["windows"]
    assert s["window_labels"][-1] == "all" and windows[-1] == [0, vlm.num_layers - 1]
    rows = rows_of(out)
    sample = scenes()[0]
    changed = False
    for setting in ("polling", "vqa"):
        q = prompts.question(sample, 0, setting)
        one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
        ids = continuation_ids(vlm, one.texts[0], answer(sample, setting, False))
        assert int((one.input_ids == vlm.image_token_id).sum()) == \
            SEQUENCE_IMAGE_TOKENS_640x480[fitted.name]
        mine = [r for r in rows if r["setting"] == setting]
        (clean,) = [r for r in mine if r["condition"] == "clean"]
        assert clean["kept"] and clean["n_answer_tokens"] == len(ids)
        if setting == "vqa":
            assert len(ids) >= 4  # " a" + the pieces of "giraffe"
        grid = {(r["condition"], r["window"]): r for r in mine if r["condition"] != "clean"}
        assert set(grid) == {(c, w) for c in knockout.CONDITIONS for w in range(len(windows))}
        changed |= any(abs(grid[(c, len(windows) - 1)]["p_answer"] - clean["p_clean"]) > 1e-3
                       for c in knockout.CONDITIONS)
        words = knockout.question_columns(vlm.tokenizer, one, 0, q.prompt)
        edges = knockout.edge_sets(one.token_map, one, 0, sample.instances[0].mask, words)
        n = len(knockout.CONDITIONS)
        feats = vlm.image_embeddings(one)
        for w in (1, len(windows) - 1):  # a window resumed from layer 1, and all layers
            with knock(vlm, [edges[c] for c in knockout.CONDITIONS],
                       layers=range(windows[w][0], windows[w][1] + 1)):
                gen = vlm.generate(repeat_batch(one, n), max_new_tokens=len(ids),
                                   image_features=feats * n)
            for c, g in zip(knockout.CONDITIONS, gen.tolist(), strict=True):
                assert grid[(c, w)]["correct"] == (g == ids), (fitted.name, setting, c, w)
    assert changed  # blocking in all layers moved the answer's probability somewhere


# ---- Liu et al. -------------------------------------------------------------------------------
def test_perceive_scores_every_task_from_every_source(fitted, data, tmp_path):
    """Every task, every source computed (the vision encoder's where it has a side); sem-seg,
    ref-seg, sem-corr and temp-corr read the VOC, RefCOCO, SPair and DAVIS fixtures."""
    out = tmp_path / "perceive"
    s = cli("perceive", "--model", fitted.path, "--n", 2, "--data", f"sem-seg=voc:{data['voc']}",
            "--data", f"ref-seg=refcoco:{data['refcoco']}",
            "--data", f"sem-corr=spair:{data['spair']}",
            "--data", f"temp-corr=davis:{data['davis']}", "--out", out)
    tasks = s["tasks"]
    assert set(TASKS) <= set(tasks)
    layers = list(range(fitted.vlm.num_layers))
    # Qwen2.5-VL reads a 96-px ShapesWorld image as 3x3 merged tokens: a small object covers
    # no token by half, so a metric can be undefined there (its score None) for every source
    tokens = len(fitted.vlm.prepare([Image.new("RGB", (96, 96))], ["x"]).token_map)
    for task in TASKS:
        stats = [json.loads(r["stats"]) for r in rows_of(out) if r["task"] == task]
        assert len(stats) == 2 and tasks[task]["n"] == 2
        wanted = {f"{k}/{ly}" for k in ("keys", "values") for ly in layers} | {"projector"}
        if task not in TEXT_TASKS:
            wanted.add("vision")  # the vision tower has no text side: text tasks go without
        for st in stats:
            assert wanted <= set(st), (fitted.name, task, sorted(st))
        if tokens > 9:
            assert tasks[task]["projector"] is not None, (fitted.name, task)
            assert (tasks[task]["vision"] is None) == (task in TEXT_TASKS), (fitted.name, task)
        else:
            assert fitted.name == QWEN25VL and tokens == 9
    assert sum(tasks[t]["projector"] is not None for t in TASKS) >= 4
    classes = {task: {r["class"] for r in rows_of(out) if r["task"] == task} for task in TASKS}
    assert all(set(c.split(",")) <= set(VOC_CLASSES) for c in classes["sem-seg"])
    assert classes["ref-seg"] == {"refcoco"}  # the kind of every RefCOCO expression
    assert classes["temp-corr"] == {p.name for p in (data["davis"] / "JPEGImages/480p").iterdir()}
    assert classes["sem-corr"] == {p.name for p in (data["spair"] / "JPEGImages").iterdir()}


def test_artifacts_flag_keys_and_block_them(fitted, data, tmp_path, monkeypatch):
    """Forced flags (z 0, min score 0) are knocked out while the text tasks and the BLINK
    multiple choice are re-measured: the blocking really runs, in the flagged layers."""
    blocked_layers = set()
    real = Knockout.blocked

    def counted(self, layer, *args, **kwargs):
        got = real(self, layer, *args, **kwargs)
        if got is not None:
            blocked_layers.add(layer)
        return got

    monkeypatch.setattr(Knockout, "blocked", counted)
    out = tmp_path / "artifacts"
    s = cli("artifacts", "--model", fitted.path, "--n", 2, "--n-images", 2, "--z", 0,
            "--min-score", 0, "--data", f"mc=blink:{data['blink']}", "--out", out)
    flagged = {int(k) for k, v in s["n_flagged"].items() if v}
    assert flagged and blocked_layers == flagged
    rows = rows_of(out)
    for condition in ("clean", "knockout"):
        assert {r["task"] for r in rows if r["condition"] == condition} == set(TEXT_TASKS)
    assert s["multiple_choice"]["n"] == 2  # the BLINK items
    scores = json.loads((out / "scores.json").read_text())
    n = len(scores["rows"])
    assert all(len(v) == n for v in scores["scores"].values()) and (out / "artifacts.png").is_file()


def test_prefix_precedes_the_image_and_changes_what_it_can(fitted, data, tmp_path):
    """The prefix run exists, and the prefix really sits before the image: image values of
    layer 0 (computed before any attention) stay as they were, those of layer 1 (after
    attending to the prefix) change; a prefix placed after the image could change neither."""
    out = tmp_path / "prefix"
    s = cli("prefix", "--model", fitted.path, "--prefix", "classes", "--tasks", "sem-seg,ref-seg",
            "--n", 2, "--out", out)
    assert {r["condition"] for r in rows_of(out)} == {"clean", "prefix"}
    assert set(TEXT_TASKS) <= set(s["delta"])
    vlm = fitted.vlm
    image, text = scenes()[1].image, "classes : giraffe , traffic light , hair drier ."
    batch = vlm.prepare([image], [logit_lens.PROMPT], prefixes=[text])
    ids = batch.input_ids[0].tolist()
    first = ids.index(vlm.image_token_id)
    assert text in vlm.tokenizer.decode(ids[:first])
    plain, prefixed = (extract(vlm, [image], [logit_lens.PROMPT], prefixes=[p])[0].sources
                       for p in (None, text))
    torch.testing.assert_close(plain["values/0"], prefixed["values/0"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain["values/1"], prefixed["values/1"], rtol=1e-3, atol=1e-5)


def test_surface_reads_the_models_answers(fitted, data, tmp_path):
    """The fitted model answers "(A)"/"(B)" on the BLINK items (right on the first, wrong on
    the second): surface must read those choices, by the likelihood of each answer string,
    as greedy decoding would."""
    out = tmp_path / "surface"
    s = cli("surface", "--model", fitted.path, "--data", f"blink:{data['blink']}", "--n", 2,
            "--out", out)
    assert s["n_items"] == 2 and s["n_scored"] == 1 and s["model_accuracy"]["rate"] == 0.0
    rows = sorted(rows_of(out), key=lambda r: int(r["item"]))
    for k, (r, item) in enumerate(zip(rows, mc_items(), strict=True)):
        said = mc_answer(k, item)
        assert r["mode"] == "answer-likelihood" and r["model"] == ord(said[1]) - ord("A"), r
        assert r["model_text"] == said
        assert r["truth"] == item.answer_index and (r["model"] == r["truth"]) == (k == 0)
        assert set(json.loads(r["readout"])) >= {"values/0", "projector", "vision"}
    shown = surface.shown_images(fitted.vlm, mc_items()[0])
    texts = fitted.vlm.decode(fitted.vlm.generate(fitted.vlm.prepare(
        [shown], [mc_items()[0].prompt()]), max_new_tokens=4))
    assert parse_choice(texts[0], mc_items()[0].choices) == rows[0]["model"]  # greedy agrees


def test_eval_on_shapesworld(fitted):
    s = cli("eval", "--model", fitted.path, "--n", 2)
    assert s["questions"] == {"generative": 2, "polling": 4, "vqa": 4}
    assert all(0.0 <= a <= 1.0 for a in s["accuracy"].values())


@pytest.mark.parametrize("name", [LLAVA15, QWEN25VL])
def test_study_runs_every_step(name, tmp_path):
    out = tmp_path / "study"
    s = cli("study", "--model", fitted_dir(name), "--scale", 0.01, "--out", out)
    assert s["sections"] == ["accuracy", "ablation", "logit-lens", "knockout", "attention",
                             "perceive", "artifacts", "prefix", "surface", "timing"]
    assert Path(s["report"]).is_file()
    for step in ("ablate", "logit-lens", "knockout", "attention", "perceive", "artifacts",
                 "prefix", "surface"):
        assert (out / step / "summary.json").is_file(), step


# ---- batched == one at a time -----------------------------------------------------------------
def test_batched_with_left_padding_equals_one_at_a_time(fitted):
    """Two scenes of different sizes and prompts in one left-padded batch compute what each
    computes alone: the final state and logits under a knockout, ablation generations,
    perception features (keys after RoPE, values, projector, vision, text spans)."""
    vlm = fitted.vlm
    samples = scenes()[:2]
    qs = [prompts.question(samples[0], 0, "vqa"), prompts.question(samples[1], 0, "polling")]
    args = ([s.image for s in samples], [q.prompt for q in qs],
            [q.answer_prefix or None for q in qs])
    batch = vlm.prepare(*args)
    alone = [vlm.prepare([a], [b], [c]) for a, b, c in zip(*args, strict=True)]
    assert (batch.attention_mask == 0).any()  # someone was padded

    def edges(one, row, b):
        e = knockout.edge_sets(one.token_map, one, row, samples[b].instances[0].mask)
        return [e["object+1->last"], e["image->question"]]

    def obj1(one, row, b):
        tm = one.token_map
        return tm.dilate(tm.positions(row, samples[b].instances[0].mask), 1, sample=row)

    layers = range(vlm.num_layers)
    with torch.no_grad(), knock(vlm, [edges(batch, b, b) for b in range(2)], layers), \
            capture(vlm, [[batch.seq_len - 1]] * 2, layers=[vlm.num_layers - 1]) as cap:
        together = vlm.forward(batch, logits_to_keep=1).logits[:, -1].float()
    states = cap.residual[vlm.num_layers]
    vector = mean_image_embedding(vlm, [s.image for s in samples])
    with ablate(vlm, [obj1(batch, b, b) for b in range(2)], vector):
        generated = vlm.generate(batch, max_new_tokens=6)
    for b, one in enumerate(alone):
        with torch.no_grad(), knock(vlm, [edges(one, 0, b)], layers), \
                capture(vlm, [[one.seq_len - 1]], layers=[vlm.num_layers - 1]) as cap:
            single = vlm.forward(one, logits_to_keep=1).logits[0, -1].float()
        torch.testing.assert_close(states[b], cap.residual[vlm.num_layers][0], rtol=1e-5,
                                   atol=1e-5)
        # the fitted rows are large (answers hang on 0.1-1% differences of the state), so
        # logits are compared relative to their own scale
        scale = float(single.abs().max())
        torch.testing.assert_close(together[b], single, rtol=0, atol=1e-5 * scale)
        with ablate(vlm, [obj1(one, 0, b)], vector):
            gen = vlm.generate(one, max_new_tokens=6)
        assert vlm.trim(generated[b]) == vlm.trim(gen[0]), (fitted.name, b)
    spans = [[(0, 6)], [(0, 2)]]
    feats = extract(vlm, args[0], args[1], spans=spans, sources=ALL_SOURCES, batch_size=2)
    for b in range(2):
        (solo,) = extract(vlm, [args[0][b]], [args[1][b]], spans=[spans[b]],
                          sources=ALL_SOURCES, batch_size=1)
        for src, x in solo.sources.items():
            torch.testing.assert_close(feats[b].sources[src], x, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, src=src: f"{fitted.name} {src}: {m}")
        for src, x in solo.text[0].items():
            torch.testing.assert_close(feats[b].text[0][src], x, rtol=1e-5, atol=1e-5)
