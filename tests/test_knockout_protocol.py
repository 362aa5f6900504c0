"""A3 as Neo et al. ran it: windows, the six edge sets of the released code
(clemneo/llava-interp scripts/attention_experiment_curate.py), image -> question words,
and first-token correctness beside every-token correctness."""

import itertools

import numpy as np
import pytest
import torch

import vislens
from vislens.data import shapesworld
from vislens.experiments import knockout, prompts
from vislens.experiments.batching import extend_batch
from vislens.interventions import LAST
from vislens.interventions import knockout as knock
from vislens.models.vlm import VLM
from vislens.runs.rundir import RunDir
from vislens.toy.build import build_model, build_processor


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return VLM(build_model(seed=3).eval(), build_processor(), "llava", name="untrained")


# ---- windows ------------------------------------------------------------------------------------
def test_default_windows_are_neos_on_32_layers_and_scale_to_4():
    neo = [(0, 9), (5, 14), (11, 20), (15, 24), (21, 31), (0, 31)]
    assert knockout.knockout_windows(32) == neo
    assert knockout.KnockoutConfig().layer_windows(32) == neo
    # bounds as layer boundaries, round(l * L / 32) half up: 10/8 -> 1, 5/8 -> 1, 15/8 -> 2 ...
    assert knockout.knockout_windows(4) == [(0, 0), (1, 1), (1, 2), (2, 2), (3, 3), (0, 3)]
    assert knockout.knockout_windows(64)[:2] == [(0, 19), (10, 29)]
    for n in range(1, 80):
        w = knockout.knockout_windows(n)
        assert w[-1] == (0, n - 1) and all(0 <= s <= e < n for s, e in w)
        assert len(set(w)) == len(w)


def test_windows_option_lists_and_sliding():
    assert knockout.knockout_windows(32, "0-9,11-20,all") == [(0, 9), (11, 20), (0, 31)]
    # a 3-layer window centred on every layer, cut at the ends
    assert knockout.knockout_windows(4, "sliding:3") == [(0, 1), (0, 2), (1, 3), (2, 3)]
    # even K: one more layer after the centre than before
    assert knockout.knockout_windows(4, "sliding:2") == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert knockout.knockout_windows(4, "sliding:1,all") == [(0, 0), (1, 1), (2, 2), (3, 3),
                                                             (0, 3)]
    for bad in ("", "0-40", "x", "sliding:0", "5-2", "sliding:k"):
        with pytest.raises(ValueError):
            knockout.knockout_windows(32, bad)
    with pytest.raises(ValueError):
        knockout.KnockoutConfig(windows="nine").validate()
    # the old evenly strided form still runs when asked for
    assert knockout.KnockoutConfig(window=2, stride=2).layer_windows(4) == [(0, 1), (2, 3),
                                                                            (0, 3)]
    s = knockout.summarise([], knockout.KnockoutConfig(conditions=("object->last",)),
                           [(0, 9), (0, 31)], 32)
    assert s["window_labels"] == ["0-9", "all"]
    s = knockout.summarise([], knockout.KnockoutConfig(conditions=("object->last",)),
                           [(0, 5)], 32)
    assert s["window_labels"] == ["0-5"]  # a window of 6 of 32 layers is not "all"


# ---- edge sets ----------------------------------------------------------------------------------
def _neo_pairs(to, frm):
    """get_attention_block_dict (attention_experiment_curate.py:34-36): (to, from) pairs."""
    return {(int(a), int(b)) for a, b in itertools.product(to, frm)}


def _pairs(edges, last):
    queries, keys = edges
    queries = [last] if isinstance(queries, str) else queries
    return _neo_pairs(queries, keys)


def test_edge_sets_are_the_released_codes(untrained):
    """Each condition's blocked (query, key) pairs equal the released code's product of its
    "to" and "from" lists, built here from the grid as utils.get_object_patch_indices does
    (any overlap, 8-neighbour buffer): object+1 -> last row keeps O+1's last-row tokens, so
    they are blocked from each other, and the sixth condition takes every image token above
    the last row, the object's included."""
    sample = shapesworld.generate(1, seed=4)[0]
    h, w = sample.image.size[1], sample.image.size[0]
    mask = np.zeros((h, w), dtype=bool)
    mask[h - 10:h - 2, w // 2 - 6:w // 2 + 6] = True  # a bottom object: O+1 meets the last row
    one = untrained.prepare([sample.image], ["is there a red circle in this image ?"])
    tm = one.token_map
    e = knockout.edge_sets(tm, one, 0, mask)
    image = tm.image_positions(0)
    cells = tm.cells(image, 0)
    width = int(cells[:, 2].max()) + 1
    start, end = int(image[0]), int(image[-1]) + 1  # start_end_indices
    _, frac = tm.coverage(0, mask)
    patch = {int(i) for i in np.flatnonzero(frac > 0)}  # utils.py:110-131, indices in 0..575

    def buffer(idx, k):  # utils.py:29-55
        for _ in range(k):
            idx = idx | {(r + dr) * width + c + dc for r, c in (divmod(i, width) for i in idx)
                         for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                         if 0 <= r + dr < width and 0 <= c + dc < width}
        return idx

    obj, obj1, obj2 = ([start + i for i in buffer(patch, k)] for k in (0, 1, 2))
    last = one.seq_len - 1  # num_tokens - 1
    last_row = list(range(end - width, end))
    neo = {
        "object->last": _neo_pairs([last], obj),  # :202-205
        "object+1->last": _neo_pairs([last], obj1),  # :212-216
        "object+2->last": _neo_pairs([last], obj2),  # :222-226
        "image-but-object+1->last": _neo_pairs([last], set(range(start, end)) - set(obj1)),
        "object+1->last-row": _neo_pairs(last_row, obj1),  # :292-296
        "image-but-last-row->last-row": _neo_pairs(last_row, range(start, end - width)),
    }
    assert set(obj1) & set(last_row)  # the case the released code handles its own way
    for c, pairs in neo.items():
        assert _pairs(e[c], last) == pairs, c
    assert set(knockout.NEO_CONDITIONS) == set(neo)
    assert set(knockout.NEO_CONDITIONS) < set(knockout.CONDITIONS)
    assert "rest->last-row" not in knockout.CONDITIONS  # no condition of the paper's
    # last-row O+1 tokens cannot read each other (earlier from later is causal anyway)
    lr = sorted(set(obj1) & set(last_row))
    assert all((a, b) in _pairs(e["object+1->last-row"], last) for a in lr for b in lr)


@pytest.mark.lookalike
def test_image_to_question_takes_only_the_question_words(untrained):
    """Not the chat template's tokens nor the answer prefix: on the toy ("<sep> it is a")
    and on LLaVA-1.5's look-alike (SentencePiece, "ASSISTANT: It is")."""
    from lookalikes import LLAVA15, checkpoint_dir

    sample = shapesworld.generate(1, seed=4)[0]
    q = prompts.question(sample, 0, "vqa")
    one = untrained.prepare([sample.image], [q.prompt], [q.answer_prefix])
    cols = knockout.question_columns(untrained.tokenizer, one, 0, q.prompt)
    assert untrained.tokenizer.decode(one.input_ids[0, cols].tolist()) == q.prompt[:-2]
    vlm = vislens.load(str(checkpoint_dir(LLAVA15)))
    prompt = "What is the object in the center of the image?"
    one = vlm.prepare([sample.image], [prompt], ["It is"])
    cols = knockout.question_columns(vlm.tokenizer, one, 0, prompt)
    assert vlm.tokenizer.decode(one.input_ids[0, cols].tolist()) == prompt[:-1]
    assert cols.max() < one.seq_len - 4  # "?", " ASS|ISTANT|:", "It is" left out
    e = knockout.edge_sets(one.token_map, one, 0, sample.instances[0].mask, cols)
    np.testing.assert_array_equal(e["image->question"][0], cols)
    with pytest.raises(ValueError, match="not among the tokens"):
        knockout.question_columns(vlm.tokenizer, one, 0, "Where is the cat?")


# ---- correctness rules --------------------------------------------------------------------------
def test_summary_reports_first_token_beside_every_token():
    cfg = knockout.KnockoutConfig(settings=("vqa",), conditions=("object->last",))
    base = {"sample": "a", "setting": "vqa", "kept": True, "p_clean": 0.8,
            "p_first_clean": 0.9}
    rows = [{**base, "condition": "clean", "window": -1, "correct": True,
             "first_correct": True, "p_answer": 0.8, "p_first": 0.9}]
    # window 0: the first piece survives, a later one does not; window 1: neither
    rows += [{**base, "condition": "object->last", "window": w, "correct": False,
              "first_correct": w == 0, "p_answer": 0.2, "p_first": 0.6} for w in range(2)]
    s = knockout.summarise(rows, cfg, [(0, 1), (0, 3)])
    assert s["relative_accuracy"]["object->last"] == [0.0, 0.0]
    assert s["relative_accuracy_first_token"]["object->last"] == [1.0, 0.0]
    assert s["relative_accuracy_first_token_by_setting"]["vqa"]["object->last"] == [1.0, 0.0]
    assert s["prob_change_first_token"]["object->last"][0] == pytest.approx(-0.3)
    assert set(s["metrics"]) == {"relative_accuracy", "relative_accuracy_first_token"}


def test_first_token_rows_are_the_argmax_where_the_answer_word_starts(tmp_path):
    """On the shipped toy: every row carries both rules, and first_correct is what one
    forward under the same knockout predicts where the answer word starts."""
    vlm = vislens.load("toy")
    samples = shapesworld.generate(2, seed=1000)
    cfg = knockout.KnockoutConfig(settings=("vqa",), windows="0-0,all",
                                  conditions=("object+1->last", "image->question",
                                              "image-but-last-row->last-row"))
    out = RunDir(tmp_path, {"t": 1}, key=["sample", "setting", "condition", "window"])
    s = knockout.run(vlm, samples, cfg, out)
    assert s["window_labels"] == ["0-0", "all"] and s["n_kept"]["vqa"] >= 1
    rows = out.rows()
    ko = [r for r in rows if r["condition"] != "clean"]
    assert ko and all(r["first_correct"] >= r["correct"] for r in ko)
    windows = cfg.layer_windows(vlm.num_layers)
    for sample in samples:
        mine = [r for r in ko if r["sample"] == sample.id]
        if not mine:
            continue
        target = [i for i, inst in enumerate(sample.instances)
                  if inst.name == mine[0]["target"]][0]
        q = prompts.question(sample, target, "vqa")
        one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
        gen = vlm.trim(vlm.generate(one, max_new_tokens=prompts.MAX_NEW_TOKENS["vqa"])[0])
        first, _ = prompts.answer_span(lambda ids: vlm.decode(torch.tensor([ids]))[0], gen, q)
        ext = extend_batch(one, torch.tensor(gen[:first], dtype=torch.long))
        words = knockout.question_columns(vlm.tokenizer, one, 0, q.prompt)
        edges = knockout.edge_sets(one.token_map, one, 0, sample.instances[target].mask, words)
        for r in mine:
            qs, ks = edges[r["condition"]]
            if isinstance(qs, str) and qs == LAST:  # the prompt's last position and the
                qs = np.arange(one.seq_len - 1, ext.seq_len)  # answer tokens before the word
            a, b = windows[r["window"]]
            with knock(vlm, [(qs, ks)], range(a, b + 1)):
                top = int(vlm.forward(ext, logits_to_keep=1).logits[0, -1].argmax())
            assert r["first_correct"] == (top == gen[first]), r


def test_cli_windows_option(tmp_path):
    import json

    from typer.testing import CliRunner

    from vislens.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    bad = runner.invoke(app, ["knockout", "--windows", "0-x", "--out", str(out)])
    assert bad.exit_code == 2 and "0-x" in bad.output and not out.exists()
    both = runner.invoke(app, ["knockout", "--windows", "all", "--window", "2",
                               "--out", str(out)])
    assert both.exit_code == 2 and not out.exists()
    ok = runner.invoke(app, ["knockout", "--n", "1", "--settings", "polling", "--conditions",
                             "object->last", "--windows", "1-2,all", "--out", str(out),
                             "--json"])
    assert ok.exit_code == 0, ok.output
    s = json.loads(ok.stdout)
    assert s["window_labels"] == ["1-2", "all"] and s["windows"] == [[1, 2], [0, 3]]
    assert set(s["relative_accuracy_first_token"]) == {"object->last"}


def test_report_section_shows_both_rules(tmp_path):
    from vislens.report.sections import knockout_section

    vlm = vislens.load("toy")
    cfg = knockout.KnockoutConfig(settings=("polling",), conditions=("object+1->last",),
                                  windows="0-1,all")
    s = knockout.execute(vlm, shapesworld.generate(2, seed=1000), cfg, tmp_path / "ko",
                         {"model": "toy"})
    assert s["plot_first_token"].endswith("knockout_first_token.png")
    section = knockout_section(s)
    titles = [t.caption for t in section.tables]
    assert any("every answer token" in t for t in titles)
    assert any("first answer-word token" in t for t in titles)
    assert len(section.images) == 2
