"""Every experiment, `eval` and `study` end to end on the look-alike checkpoints, proving each
path ran, family by family.

Random weights almost never answer right, so a run on them keeps no sample and its
conditions never execute. The fixtures here (answer_head.py) are the look-alikes of
tests/lookalikes/ with ONLY their unembedding fitted, so that greedy decoding answers the
test scenes right when the target is visible and wrong when its pixels are noised;
everything else is the random model. The scenes are 640x480, 560x420 and 384x288
COCO-format images whose targets have multi-piece names ("gir|af|fe"), so the
experiments run on the real geometries: 576-2929-token sequences of the paper's four,
crops + global view (SmolVLM), tiles + thumbnail (InternVL), a break-delimited grid
(Mistral 3), a prefix LM (PaliGemma), Qwen3-VL's DeepStack (the mean ablation replaces
the injected features too), Gemma 3's bidirectional image blocks and 256-token images.
Part-B commands read ShapesWorld task data plus native-format fixtures (Pascal VOC masks,
a BLINK parquet).

Every test is parametrised over the families it covers (`fitted`, indirect). The paper's
four get the deepest checks (the experiments' numbers against runs done by hand: batched
against alone, knockout windows against greedy decoding, every condition and task); the
later families run each command at the smallest size that still runs every path (one
selected image, two perception items) and are checked to keep samples on their geometry.
Family-specific expectations are the tables below, keyed by checkpoint. Sizes are the
smallest that still exercise every path: this module is about what runs, not about the
numbers.
"""

from __future__ import annotations

import functools
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
from lookalikes import (
    GEMMA3,
    INTERNVL,
    LLAVA15,
    MISTRAL3,
    NEXT,
    ONEVISION,
    PALIGEMMA,
    PAPER,
    QWEN2VL,
    QWEN3VL,
    QWEN25VL,
    SMOLVLM,
)
from PIL import Image
from typer.testing import CliRunner

import vislens
from vislens.cli import app
from vislens.data.voc import VOC_CLASSES
from vislens.experiments import knockout, logit_lens, patching, prompts
from vislens.experiments.accuracy import generate_answers
from vislens.experiments.batching import repeat_batch
from vislens.experiments.perception import surface
from vislens.experiments.perception.features import ALL_SOURCES, extract
from vislens.experiments.perception.surface import parse_choice
from vislens.experiments.selection import noise_object
from vislens.interventions import ablate, capture, mean_image_embedding
from vislens.interventions import knockout as knock
from vislens.interventions.knockout import Knockout

# every command on every look-alike: the long end-to-end runs, in the full run only
pytestmark = [pytest.mark.slow, pytest.mark.lookalike]

# the families after the paper's four: multi-image tiling, breaks and a prefix LM (issue #14
# part 2), then Qwen2-VL / Qwen3-VL (DeepStack) / Gemma 3
TILES_BREAKS_PREFIX = (SMOLVLM, INTERNVL, MISTRAL3, PALIGEMMA)
QWEN_GEMMA = (QWEN2VL, QWEN3VL, GEMMA3)
LATER = TILES_BREAKS_PREFIX + QWEN_GEMMA
ALL = PAPER + LATER

SETTINGS = ("generative", "polling", "vqa")
CONDITIONS = ("object", "object+1", "object+2", "register", "random-matched", "ig-matched",
              "all-but-object+1", "random-40")
TASKS = ("fg-seg", "co-seg", "sem-seg", "ref-seg", "sem-corr", "temp-corr")
TEXT_TASKS = ("sem-seg", "ref-seg")

# ---- what each family is, written out (not read from the builders) ----------------------------
FAMILY = {LLAVA15: "llava", NEXT: "llava_next", ONEVISION: "llava_onevision",
          QWEN25VL: "qwen2_5_vl", SMOLVLM: "idefics3", INTERNVL: "internvl",
          MISTRAL3: "mistral3", PALIGEMMA: "paligemma", QWEN2VL: "qwen2_vl",
          QWEN3VL: "qwen3_vl", GEMMA3: "gemma3"}
LAYERS = {**dict.fromkeys(PAPER + TILES_BREAKS_PREFIX, 2), QWEN2VL: 2, QWEN3VL: 4, GEMMA3: 2}
# patch tokens of a 640x480 scene: the paper's four (576 / 2304 / 2889 / 391, the fact
# sheet's); 12 crops + global view of 9x9, 12 tiles + thumbnail of 16x16, an 18x23 grid,
# SigLIP's 16x16
PATCHES_640x480 = {LLAVA15: 576, NEXT: 2304, ONEVISION: 2889, QWEN25VL: 391,
                   SMOLVLM: 1053, INTERNVL: 3328, MISTRAL3: 414, PALIGEMMA: 256}
# all image-token ids of that scene, with NeXT / OneVision's row newlines (2340 / 2929)
SEQUENCE_IMAGE_TOKENS_640x480 = {LLAVA15: 576, NEXT: 2340, ONEVISION: 2929, QWEN25VL: 391}
# marker tokens of that image's block: crop markers (<fake_token_around_image>, the pieces
# of <row_r_col_c>, crop-row newlines, <global-img>: not counted here), <img> </img>,
# 17 breaks + [IMG_END], none
MARKERS_640x480 = {SMOLVLM: None, INTERNVL: 2, MISTRAL3: 18, PALIGEMMA: 0}

# ---- how big each family's runs are ------------------------------------------------------------
# ablate: (settings, conditions, integrated-gradient steps). The later families leave out the
# generative setting (40 new tokens a condition) and most conditions.
ABLATE = {**dict.fromkeys(PAPER, (SETTINGS, CONDITIONS, 2)),
          **dict.fromkeys(TILES_BREAKS_PREFIX,
                          (("polling", "vqa"), ("object+1", "ig-matched", "all-but-object+1"),
                           2)),
          **dict.fromkeys(QWEN_GEMMA,
                          (("vqa",), ("object", "object+1", "random-matched", "ig-matched",
                                      "all-but-object+1"), 1))}
# perceive: the paper's four run every task on every native format, the others two tasks
PERCEIVE_DATA = ("--data", "sem-seg=voc:{voc}", "--data", "ref-seg=refcoco:{refcoco}",
                 "--data", "sem-corr=spair:{spair}", "--data", "temp-corr=davis:{davis}")


@dataclass
class Fitted:
    name: str
    path: Path

    @functools.cached_property
    def vlm(self):
        return vislens.load(str(self.path))


@pytest.fixture(scope="module")
def fitted(request) -> Fitted:
    """The look-alike `request.param` with its fitted unembedding: name, directory and (loaded
    when first asked for) the VLM. Tests name their families with `over(...)`."""
    return Fitted(request.param, fitted_dir(request.param))


def over(*names: str):
    """Run the test on the fitted look-alikes `names` (module-scoped: one loaded at a time)."""
    return pytest.mark.parametrize("fitted", names, indirect=True)


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


def lens_word_starts(tokenizer, name: str) -> set[int]:
    """What the lens counts for a class: the starts of its head words (name's and listed
    synonyms', plurals included), each written alone and in a sentence."""
    from vislens.data.answers import head_words

    return set().union(*(word_starts(tokenizer, w) for w in head_words(name)))


# ---- the construction -------------------------------------------------------------------------
@over(*PAPER)
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


@over(*PAPER)
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


@over(*ALL)
def test_info_counts_the_image_tokens(fitted):
    name, path = fitted.name, fitted.path
    facts = cli("info", "--model", path)
    assert facts["family"] == FAMILY[name]
    if name in TILES_BREAKS_PREFIX:
        vlm = fitted.vlm
        assert facts["layers"] == vlm.num_layers
        assert facts["image_tokens_for"]["640x480 (photo)"]["image_tokens"] == \
            PATCHES_640x480[name]
        markers = len(vlm.prepare([scenes()[0].image], ["x"]).token_map.marker_positions(0))
        assert markers == (MARKERS_640x480[name] if MARKERS_640x480[name] is not None
                           else markers)
        assert markers > 0 or name == PALIGEMMA


@over(*ALL)
def test_eval_on_shapesworld(fitted):
    n = 2 if fitted.name in PAPER else 1
    s = cli("eval", "--model", fitted.path, "--n", n)
    assert s["questions"] == {"generative": n, "polling": 2 * n, "vqa": 2 * n}
    assert all(0.0 <= a <= 1.0 for a in s["accuracy"].values())


# ---- Neo et al. -------------------------------------------------------------------------------
@over(*ALL)
def test_ablate_keeps_samples_and_runs_every_condition(fitted, data, tmp_path):
    """Noise filter, the family's conditions (integrated gradients included; for Qwen3-VL the
    mean ablation and the gradients go through the injected features too) on the real
    geometry."""
    name, out = fitted.name, tmp_path / "ablate"
    settings, conditions, ig_steps = ABLATE[name]
    s = cli("ablate", "--model", fitted.path, "--data", f"coco:{data['coco']}", "--n", 1,
            "--settings", ",".join(settings), "--ig-steps", ig_steps,
            "--conditions", ",".join(conditions),
            "--reference", f"imagenet:{data['imagenet']}", "--out", out)
    assert s["n_kept"] == {k: 1 for k in settings}, s["n_kept"]
    rows = rows_of(out)
    assert {r["condition"] for r in rows} == {"clean", "noised", *conditions}
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting]
        (clean,) = [r for r in mine if r["condition"] == "clean"]
        (noised,) = [r for r in mine if r["condition"] == "noised"]
        assert clean["correct"] and not noised["correct"] and clean["kept"] and noised["kept"]
        assert clean["text"].strip() == answer(scenes()[0], setting, False)
        tokens = {r["condition"]: r["n_tokens"] for r in mine
                  if r["condition"] not in ("clean", "noised")}
        assert set(tokens) == set(conditions) == set(s["drop"][setting])
        assert tokens["ig-matched"] == tokens["object+1"] > 0
        if name in PATCHES_640x480:
            # every patch token of the 640x480 scene is either object+1 or the rest
            assert tokens["all-but-object+1"] + tokens["object+1"] == PATCHES_640x480[name]
        if name in PAPER:
            assert 0 < tokens["object"] <= tokens["object+1"] <= tokens["object+2"]
            assert tokens["ig-matched"] == tokens["random-matched"] == tokens["object+1"]
            assert tokens["random-40"] == 40


@over(*PAPER)
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


@over(*LATER)
def test_logit_lens_finds_the_fitted_patches(fitted, data, tmp_path):
    """One image: a row per patch token with an entry per layer, and the fitted object
    patches found as hits at the last layer."""
    name, out = fitted.name, tmp_path / "lens"
    viewers = 1 if name in QWEN_GEMMA else 0
    s = cli("logit-lens", "--model", fitted.path, "--data", f"coco:{data['lens']}", "--n", 1,
            "--viewers", viewers, "--out", out)
    last = LAYERS[name]
    assert fitted.vlm.num_layers == last
    assert s["n_images"] == 1 and s["n_layers"] == last + 1
    assert s["hit_rate"] > 0 and s["per_layer"][last] > 0
    rows = rows_of(out)
    assert all(len(r["hit"]) == last + 1 for r in rows)
    if name in PATCHES_640x480:
        # one stored row per patch token
        assert len(rows) == PATCHES_640x480[name]
    hits = [r for r in rows if r["hit"][last] and r["coverage"] >= 0.5]
    assert len(hits) >= 8, (name, len(hits))


@over(*PAPER)
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


@over(*LATER)
def test_knockout_keeps_samples(fitted, data, tmp_path):
    name, out = fitted.name, tmp_path / "knockout"
    windows = ["--window", 2, "--stride", 2] if LAYERS[name] > 2 else []  # 2 windows + all
    s = cli("knockout", "--model", fitted.path, "--data", f"coco:{data['coco']}", "--n", 1,
            "--settings", "vqa", *windows, "--out", out)
    assert s["n_kept"] == {"vqa": 1}
    rows = rows_of(out)
    assert all(r["kept"] for r in rows if r["condition"] == "clean")
    conditions = {r["condition"] for r in rows}
    assert len(conditions) > 1 and "clean" in conditions


@over(*LATER)
def test_attention(fitted, data, tmp_path):
    name = fitted.name
    viewers = 1 if name in QWEN_GEMMA else 0
    s = cli("attention", "--model", fitted.path, "--data", f"coco:{data['lens']}", "--n", 1,
            "--viewers", viewers, "--out", tmp_path / "attention")
    assert s["n_images"] == 1 and s["n_layers"] == LAYERS[name]
    image = [m for m in s["per_layer"]["image"] if m is not None]
    assert len(image) == LAYERS[name] and all(0 < m < 1 for m in image)


# ---- Liu et al. -------------------------------------------------------------------------------
@over(*ALL)
def test_perceive_scores_every_task_from_every_source(fitted, data, tmp_path):
    """Every source of every layer is computed, the vision encoder's where it has a side
    (through the family's projector grouping: Qwen's 2x2 merge windows, Gemma's 4x4 pool).
    The paper's four run every task (sem-seg, ref-seg, sem-corr and temp-corr read the VOC,
    RefCOCO, SPair and DAVIS fixtures); the others fg-seg and sem-seg."""
    name, vlm, out = fitted.name, fitted.vlm, tmp_path / "perceive"
    if name in PAPER:
        tasks, extra = TASKS, [a.format(**data) for a in PERCEIVE_DATA]
    else:
        tasks, extra = ("fg-seg", "sem-seg"), ["--tasks", "fg-seg,sem-seg",
                                              "--data", f"sem-seg=voc:{data['voc']}"]
    s = cli("perceive", "--model", fitted.path, "--n", 2, *extra, "--out", out)
    assert set(tasks) <= set(s["tasks"])
    layers = list(range(vlm.num_layers))
    assert len(layers) == LAYERS[name]
    # Qwen2.5-VL (and Qwen2-VL) read a 96-px ShapesWorld image as 3x3 merged tokens: a small
    # object covers no token by half, so a metric can be undefined there (its score None) for
    # every source
    n_tokens = len(vlm.prepare([Image.new("RGB", (96, 96))], ["x"]).token_map)
    for task in tasks:
        stats = [json.loads(r["stats"]) for r in rows_of(out) if r["task"] == task]
        assert len(stats) == 2 and s["tasks"][task]["n"] == 2
        wanted = {f"{k}/{ly}" for k in ("keys", "values") for ly in layers} | {"projector"}
        if task not in TEXT_TASKS:
            wanted.add("vision")  # the vision tower has no text side: text tasks go without
        for st in stats:
            assert wanted <= set(st), (name, task, sorted(st))
        if n_tokens > 9:
            assert s["tasks"][task]["projector"] is not None, (name, task)
            assert (s["tasks"][task]["vision"] is None) == (task in TEXT_TASKS), (name, task)
        else:
            assert name in (QWEN25VL, QWEN2VL) and n_tokens == 9
    classes = {task: {r["class"] for r in rows_of(out) if r["task"] == task} for task in tasks}
    assert all(set(c.split(",")) <= set(VOC_CLASSES) for c in classes["sem-seg"])
    if name in PAPER:
        assert sum(s["tasks"][t]["projector"] is not None for t in TASKS) >= 4
        assert classes["ref-seg"] == {"refcoco"}  # the kind of every RefCOCO expression
        assert classes["temp-corr"] == {p.name for p in
                                        (data["davis"] / "JPEGImages/480p").iterdir()}
        assert classes["sem-corr"] == {p.name for p in (data["spair"] / "JPEGImages").iterdir()}


@over(*ALL)
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
    name, out = fitted.name, tmp_path / "artifacts"
    n, size = (2, []) if name in PAPER else (1, ["--layers", "0,1"])
    s = cli("artifacts", "--model", fitted.path, "--n", n, "--n-images", 2, "--z", 0,
            "--min-score", 0, *size, "--data", f"mc=blink:{data['blink']}", "--out", out)
    flagged = {int(k) for k, v in s["n_flagged"].items() if v}
    assert flagged and blocked_layers == flagged
    rows = rows_of(out)
    assert {r["condition"] for r in rows} == {"clean", "knockout"}
    for condition in ("clean", "knockout"):
        assert {r["task"] for r in rows if r["condition"] == condition} == set(TEXT_TASKS)
    assert s["multiple_choice"]["n"] == n  # the BLINK items
    scores = json.loads((out / "scores.json").read_text())
    k = len(scores["rows"])
    assert all(len(v) == k for v in scores["scores"].values()) and (out / "artifacts.png").is_file()


@over(*ALL)
def test_prefix_precedes_the_image_and_changes_what_it_can(fitted, data, tmp_path):
    """The prefix run exists, and the prefix really sits before the image: image values of
    layer 0 (computed before any attention) stay as they were, those of layer 1 (after
    attending to the prefix) change; a prefix placed after the image could change neither."""
    name, out = fitted.name, tmp_path / "prefix"
    tasks, n = (TEXT_TASKS, 2) if name in PAPER else (("sem-seg",), 1)
    s = cli("prefix", "--model", fitted.path, "--prefix", "classes", "--tasks", ",".join(tasks),
            "--n", n, "--out", out)
    assert {r["condition"] for r in rows_of(out)} == {"clean", "prefix"}
    assert set(tasks) <= set(s["delta"])
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


# ---- causal tracing -----------------------------------------------------------------------------
@over(*ALL)
def test_patch_restores_every_group_of_the_layout(fitted, data, tmp_path):
    """Noise pairs on the COCO-style scenes, on each family's real geometry (tiles, crops,
    breaks, DeepStack, bidirectional image blocks, a prefix LM): the fitted head says the
    target clean and the other object noised, so the pair is kept, every group of the layout
    is restored at every layer, attribution and exact patching are compared on a token
    layer and the per-token viewer is written."""
    name, out = fitted.name, tmp_path / "patch"
    s = cli("patch", "--model", fitted.path, "--data", f"coco:{data['coco']}", "--n", 1,
            "--corrupt", "noise", "--layers", "all", "--token-layers", 0, "--exact-tokens", 12,
            "--maps", 1, "--out", out)
    assert s["n_pairs"] == 1, (name, s["funnel"])
    assert s["groups"] == list(patching.GROUPS) and s["layers"] == list(range(LAYERS[name]))
    for group, curve in s["restored"]["residual"].items():
        assert all(v is not None and np.isfinite(v) for v in curve["mean"]), (name, group)
    assert s["n_positions"]["object"] >= 1 and s["n_positions"]["answer-position"] == 1
    token = s["attribution"]["residual"]["0"]
    assert token["n"] == 1 and token["spearman"] is not None and token["topk_restored"] is not None
    assert len(s["maps"]) == 1 and len(s["viewers"]) == 1, (name, s["maps"], s["viewers"])


@over(*ALL)
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
        assert r["model_text"] == said, (fitted.name, r)
        assert r["truth"] == item.answer_index and (r["model"] == r["truth"]) == (k == 0)
        assert set(json.loads(r["readout"])) >= {"values/0", "projector", "vision"}
    vlm = fitted.vlm
    shown = surface.shown_images(vlm, mc_items()[0])
    texts = vlm.decode(vlm.generate(vlm.prepare([shown], [mc_items()[0].prompt()]),
                                    max_new_tokens=4))
    assert parse_choice(texts[0], mc_items()[0].choices) == rows[0]["model"]  # greedy agrees


@over(*ALL)
def test_text_tasks_read_the_prompt_after_the_markers(fitted):
    """Text spans of the prompt map to their own ids whatever frames the image (markers,
    breaks, a prefix-LM suffix)."""
    from vislens.experiments.perception.features import after_image, text_columns

    vlm = fitted.vlm
    batch = vlm.prepare([scenes()[0].image], ["Is there a giraffe in this image?"])
    cols = text_columns(vlm, batch, 0, "Is there a giraffe in this image?", (9, 18))
    assert vlm.tokenizer.decode(batch.input_ids[0, cols]).strip() == "a giraffe"
    question = after_image(batch, 0)
    assert not np.isin(question, batch.token_map.marker_positions(0)).any()
    assert set(cols) <= set(question.tolist())


@pytest.mark.parametrize("name", [LLAVA15, QWEN25VL])
def test_study_runs_every_step(name, tmp_path):
    out = tmp_path / "study"
    s = cli("study", "--model", fitted_dir(name), "--scale", 0.01, "--out", out)
    assert s["sections"] == ["accuracy", "ablation", "logit-lens", "knockout", "patch",
                             "attention", "perceive", "artifacts", "prefix", "surface", "timing"]
    assert Path(s["report"]).is_file()
    for step in ("ablate", "logit-lens", "knockout", "patch", "attention", "perceive",
                 "artifacts", "prefix", "surface"):
        assert (out / step / "summary.json").is_file(), step


# ---- batched == one at a time -----------------------------------------------------------------
@over(*PAPER)
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


# ---- a model type without a family module -----------------------------------------------------
@pytest.fixture
def generic_gemma3(monkeypatch) -> Path:
    """The fitted Gemma 3 look-alike as a model type without a family module: the generic
    fallback (positions only) on a model that answers right."""
    from vislens.models.families import FAMILIES

    monkeypatch.delitem(FAMILIES, "gemma3")
    return fitted_dir(GEMMA3)


def test_generic_fallback_runs_the_layout_free_experiments(generic_gemma3, data, tmp_path):
    """Without a layout: ablation of register / random-K tokens, knockout of image ->
    question, the logit lens over every image token, patching of the question and the
    answer position; what needs pixels is one line."""
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
    s = cli("patch", "--model", path, "--data", coco, "--n", 1, "--corrupt", "noise",
            "--token-layers", 1, "--exact-tokens", 8, "--out", tmp_path / "patch")
    assert s["n_pairs"] == 1 and s["groups"] == list(patching.LAYOUT_FREE_GROUPS)
    assert all(v is not None for c in s["restored"]["residual"].values() for v in c["mean"])
    assert s["attribution"]["residual"]["1"]["n"] == 1  # by positions: no boxes, no maps
    assert s["maps"] == [] and s["viewers"] == []
    for command, extra in (("ablate", ["--conditions", "object,random-40"]),
                           ("knockout", ["--conditions", "object->last"]),
                           ("patch", ["--corrupt", "noise", "--groups", "question,object"])):
        bad = tmp_path / f"bad-{command}"
        r = CliRunner().invoke(app, [command, "--model", str(path), "--data", coco, "--n", "1",
                                     "--out", str(bad), *extra])
        assert r.exit_code == 2 and "needs a token layout" in r.output, r.output
        assert not bad.exists()
