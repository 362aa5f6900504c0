"""Neo et al. experiments on an untrained toy: mechanics checked against references."""

import numpy as np
import pytest
import torch

from vislens.data import shapesworld
from vislens.experiments import ablation, knockout, logit_lens
from vislens.experiments.batching import repeat_batch
from vislens.interventions import LAST, ablate
from vislens.interventions import knockout as knock
from vislens.models.vlm import VLM
from vislens.runs.rundir import RunDir
from vislens.toy.build import build_model, build_processor


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(build_model(seed=3).eval(), build_processor(), "llava", name="untrained")


@pytest.fixture(scope="module")
def scenes():
    return shapesworld.generate(3, seed=11)


def test_logit_lens_last_layer_is_the_models_own_prediction(vlm, scenes, tmp_path):
    run = RunDir(tmp_path, {"t": 1}, key=["sample"])
    summary = logit_lens.run(vlm, scenes[:2], logit_lens.LensConfig(viewers=1, top_k=3,
                                                                          area=None), run)
    rows = run.rows()
    L = vlm.num_layers
    n_img = 144
    assert len(rows) == 2 * n_img  # one row per image token, lists over the layers
    assert all(len(r["topk_ids"]) == L + 1 and len(r["hit"]) == L + 1 for r in rows)
    batch = vlm.prepare([scenes[0].image], [logit_lens.PROMPT])
    logits = vlm.forward(batch).logits[0]
    top1 = {r["position"]: r["topk_ids"][L][0] for r in rows if r["sample"] == scenes[0].id}
    assert len(top1) == n_img
    for pos, tok in top1.items():
        assert int(logits[pos].argmax()) == tok
    assert summary["n_layers"] == L + 1 and len(summary["per_layer"]) == L + 1
    page = (tmp_path / "viewer" / f"{scenes[0].id}.html").read_text()
    for t in range(n_img):
        for layer in range(L + 1):
            assert f'data-t="{t}" data-l="{layer}"' in page
    assert "http://" not in page and "https://" not in page


def _token_table(tokens, n_layers):
    """Token rows as the lens stores them: (position, hits, class probs, coverage, bg)."""
    import pyarrow as pa

    hit = np.array([t[1] for t in tokens], dtype=bool)
    prob = np.array([t[2] for t in tokens], dtype=np.float32)
    return pa.table({"sample": ["s"] * len(tokens), "position": [t[0] for t in tokens],
                     "coverage": [float(t[3]) for t in tokens],
                     "background": [t[4] for t in tokens],
                     "hit": logit_lens._lists(hit), "class_prob": logit_lens._lists(prob)})


def test_logit_lens_summary_on_hand_built_rows(vlm, tmp_path):
    L = vlm.num_layers + 1
    tokens = [(1, [la == 3 for la in range(L)], [0.9 if la == 3 else 0.1 for la in range(L)],
               1.0, False),
              (2, [False] * L, [0.0] * L, 0.8, False),
              (3, [la == 0 for la in range(L)], [0.5] * L, 0.0, True)]
    table = _token_table(tokens, L)
    s = logit_lens.summarise([table], vlm, logit_lens.LensConfig(), tmp_path)
    assert s["hit_rate"] == 0.5 and s["peak_layer_mean"] == 3.0
    assert s["per_layer"][3] == 0.5 and s["per_layer"][0] == 0.0
    assert s["background_rate"] == 1.0
    # the same tokens split over parts (as flushes write them) give the same summary
    parts = [table.slice(0, 1), table.slice(1, 0), table.slice(1, 2)]
    assert logit_lens.summarise(parts, vlm, logit_lens.LensConfig(), tmp_path) == s


def test_logit_lens_summary_streams_parts_without_loading_rows(vlm, scenes, tmp_path,
                                                               monkeypatch):
    """The summary is tallied part by part from the columns it needs: RunDir.rows (every
    column of every part at once) is never called, no top-k column is read, and a resumed
    run (one image already done) summarises to exactly what one uninterrupted run does."""
    import pyarrow.parquet as pq

    config = logit_lens.LensConfig(viewers=0, batch_size=1, area=None)
    whole = logit_lens.run(vlm, scenes, config, RunDir(tmp_path / "a", {"t": 1}, ["sample"]))
    first = RunDir(tmp_path / "b", {"t": 1}, key=["sample"])
    logit_lens.run(vlm, scenes[:1], config, first)
    read = []
    real = pq.read_table

    def spy(path, *args, columns=None, **kwargs):
        read.append(columns)
        return real(path, *args, columns=columns, **kwargs)

    def refuse(self):
        raise AssertionError("the lens summary must not load every row")

    monkeypatch.setattr(pq, "read_table", spy)
    monkeypatch.setattr(RunDir, "rows", refuse)
    resumed = RunDir(tmp_path / "b", {"t": 1}, key=["sample"])
    assert resumed.done(sample=scenes[0].id)
    decoded = []
    monkeypatch.setattr(logit_lens, "_decode", lambda *a: decoded.append(1) or real_decode(*a))
    again = logit_lens.run(vlm, scenes, config, resumed)
    assert len(decoded) == 2 * (vlm.num_layers + 1)  # only the two images not done before
    assert again == whole
    assert read and all(c is not None and "topk_ids" not in c and "topk_probs" not in c
                        for c in read)
    assert len(list((tmp_path / "b" / "rows.parquet").glob("part-*.parquet"))) == 3
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in
               (tmp_path / "b" / "rows.parquet").glob("part-*.parquet")) == 3 * 144


real_decode = logit_lens._decode


def test_ablation_batch_equals_one_condition_at_a_time(vlm, scenes):
    sample = scenes[0]
    one = vlm.prepare([sample.image], ["is there a red circle in this image ?"])
    feats = vlm.image_embeddings(one)
    tm = one.token_map
    obj = tm.positions(0, sample.instances[0].mask)
    sets = [obj, tm.dilate(obj, 1), np.array([], dtype=np.int64)]
    vec = torch.randn(vlm.language_model.config.hidden_size)
    rows = repeat_batch(one, len(sets))
    with ablate(vlm, sets, vec):
        together = vlm.forward(rows, image_features=feats * 3, logits_to_keep=1).logits[:, -1]
    for i, s in enumerate(sets):
        with ablate(vlm, [s], vec):
            alone = vlm.forward(one, logits_to_keep=1).logits[0, -1]
        torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)
    clean = vlm.forward(one, logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(together[2], clean, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0], clean)


def test_integrated_gradients_complete(vlm, scenes):
    """IG attributions add up to logit(clean) - logit(all patches at the baseline)."""
    sample = scenes[1]
    one = vlm.prepare([sample.image], ["is there a red circle in this image ?"])
    feats = vlm.image_embeddings(one)
    vec = feats[0].mean(0)
    target = 5
    attr = ablation.integrated_gradients(vlm, one, feats, target, vec, steps=32)
    assert attr.shape == (144,)
    with torch.no_grad():
        clean = vlm.forward(one, logits_to_keep=1).logits[0, -1, target]
        with ablate(vlm, [one.token_map.image_positions(0)], vec):
            base = vlm.forward(one, logits_to_keep=1).logits[0, -1, target]
    delta = float(clean - base)
    assert abs(attr.sum() - delta) <= 0.05 * abs(delta) + 1e-3


def test_token_sets_follow_the_protocol(vlm, scenes, monkeypatch):
    sample = scenes[0]
    q = shapesworld.questions(sample, "polling", target=0)[0]
    one = vlm.prepare([sample.image], [q.prompt])
    feats = vlm.image_embeddings(one)
    monkeypatch.setattr(ablation, "answer_token", lambda *a: (torch.zeros(0, dtype=torch.long), 7))
    cfg = ablation.AblationConfig(seed=4, ig_steps=4)
    sets = ablation.token_sets(vlm, one, feats, sample.instances[0].mask, cfg, 0, q, "zeros", 3)
    image = one.token_map.image_positions(0)
    assert set(sets["object"]) <= set(sets["object+1"]) <= set(sets["object+2"])
    assert len(sets["random-matched"]) == len(sets["object+1"]) == len(sets["ig-matched"])
    assert set(sets["all-but-object+1"]) == set(image) - set(sets["object+1"])
    assert "random-250" not in sets and len(sets["random-100"]) == 100
    norms = feats[0].norm(dim=-1).numpy()
    assert set(sets["register"]) == set(image[norms > norms.mean() + 2 * norms.std(ddof=1)])


def test_ablation_summary_counts_broken_answers(vlm):
    rows = [{"sample": f"s{i}", "setting": "polling", "condition": "clean", "kept": True,
             "correct": True, "n_tokens": 0} for i in range(4)]
    rows += [{"sample": f"s{i}", "setting": "polling", "condition": "object", "kept": True,
              "correct": i == 0, "n_tokens": 3} for i in range(4)]
    s = ablation.summarise(rows, vlm, ablation.AblationConfig(settings=("polling",)))
    assert s["n_kept"] == {"polling": 4}
    assert s["drop"]["polling"]["object"] == 75.0
    lo, hi = s["ci95"]["polling"]["object"]
    assert lo <= 75.0 <= hi


def test_knockout_sweep_batch_equals_separate_runs(vlm, scenes):
    sample = scenes[0]
    one = vlm.prepare([sample.image], ["is there a red circle in this image ?"])
    feats = vlm.image_embeddings(one)
    edges = knockout.edge_sets(one.token_map, one, 0, sample.instances[0].mask)
    windows = [(0, 1), (2, 3)]
    grid = [("object+1->last", 0), ("image->question", 1), ("object+1->last-row", 1)]
    empty = (LAST, np.zeros(0, dtype=np.int64))
    rows = repeat_batch(one, len(grid))
    from contextlib import ExitStack
    with ExitStack() as stack:
        for w, (a, b) in enumerate(windows):
            stack.enter_context(knock(vlm, [edges[c] if wi == w else empty for c, wi in grid],
                                      range(a, b + 1)))
        together = vlm.forward(rows, image_features=feats * 3, logits_to_keep=1).logits[:, -1]
    for i, (c, w) in enumerate(grid):
        with knock(vlm, [edges[c]], range(windows[w][0], windows[w][1] + 1)):
            alone = vlm.forward(one, logits_to_keep=1).logits[0, -1]
        torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)


def test_knockout_edge_sets(vlm, scenes):
    sample = scenes[0]
    one = vlm.prepare([sample.image], ["is there a red circle in this image ?"])
    tm = one.token_map
    e = knockout.edge_sets(tm, one, 0, sample.instances[0].mask)
    image = set(tm.image_positions(0))
    last_row = set(tm.last_row(0))
    assert len(last_row) == 12
    assert e["object->last"][0] == LAST
    # as released: O+1 -> last row keeps O+1's own last-row tokens among the keys
    assert set(e["object+1->last-row"][1]) == set(e["object+1->last"][1])
    assert set(e["rest->last-row"][1]) | set(e["object+1->last-row"][1]) | last_row == image
    assert set(e["image-but-last-row->last-row"][1]) == image - last_row
    q = e["image->question"][0]
    seq = one.input_ids.shape[1]
    assert q.min() > max(image) and q.max() == seq - 2 and len(q) == 9


def test_knockout_summary(vlm):
    cfg = knockout.KnockoutConfig(settings=("polling",), conditions=("object->last",))
    rows = [{"sample": "a", "setting": "polling", "condition": "clean", "window": -1,
             "kept": True, "correct": True, "p_answer": 0.9, "p_clean": 0.9}]
    rows += [{"sample": "a", "setting": "polling", "condition": "object->last", "window": w,
              "kept": True, "correct": w == 0, "p_answer": 0.5, "p_clean": 0.9}
             for w in range(2)]
    s = knockout.summarise(rows, cfg, [(0, 1), (0, 3)])
    assert s["relative_accuracy"]["object->last"] == [1.0, 0.0]
    assert s["prob_change"]["object->last"][0] == pytest.approx(-0.4)
    assert s["window_labels"] == ["0-1", "all"]


def test_extend_batch_keeps_qwen_positions_exact():
    """Teacher forcing (used by integrated gradients) grows every per-token tensor: the
    prompt's last logits are unchanged, with mRoPE positions from the model itself."""
    import vislens
    from vislens.experiments.batching import extend_batch

    vlm = vislens.load("toy-qwen")
    scene = shapesworld.make_scene(1000, 0)
    batch = vlm.prepare([scene.image], ["is there a red circle in this image ?"])
    ids = vlm.tokenizer.encode("yes no", add_special_tokens=False)
    longer = extend_batch(batch, torch.tensor(ids))
    assert longer.inputs["mm_token_type_ids"].shape == longer.input_ids.shape
    torch.testing.assert_close(vlm.forward(longer).logits[0, -3],
                               vlm.forward(batch).logits[0, -1], rtol=1e-4, atol=1e-5)
