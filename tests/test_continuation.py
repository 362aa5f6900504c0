"""Continuing from the clean pass's keys and values gives what the full pass gives.

interventions/continuation lets a knockout (or an ablation) run only the positions and
layers it changes. Every shortcut is checked here against the full recomputation it
replaces, on the paper checkpoints' look-alikes (real processors, token counts, mRoPE,
left padding), and a deliberately wrong first position is shown to be caught. Families
whose positions see later ones (Gemma 3's bidirectional image block, PaliGemma's
prefix-LM) must not take the shortcut: there it would be wrong, and it is refused.
"""

import lookalikes
import numpy as np
import pytest
import torch
from PIL import Image

import vislens
from vislens.experiments import knockout
from vislens.experiments.batching import extend_batch
from vislens.interventions import capture
from vislens.interventions import knockout as knock
from vislens.interventions.continuation import advance, embed, record

# NeXT's and OneVision's anyres images (2340 / 2929 tokens at 640x480) make their runs the
# slow ones: the everyday loop continues LLaVA-1.5 and Qwen2.5-VL, the full run all four
SLOW_NEXT = pytest.param(lookalikes.NEXT, marks=pytest.mark.slow)
PAPER = (lookalikes.LLAVA15, SLOW_NEXT, lookalikes.QWEN25VL,
         pytest.param(lookalikes.ONEVISION, marks=pytest.mark.slow))
TOL = 1e-5


def _images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((300, 400, 3)) * 255).astype("uint8")),
            Image.fromarray((rng.random((200, 380, 3)) * 255).astype("uint8"))]


@pytest.fixture(scope="module", params=PAPER)
def lookalike(request):
    return vislens.load(str(lookalikes.checkpoint_dir(request.param)))


def _padded(vlm):
    batch = vlm.prepare(_images(), ["Is there a cat in this image?", "What is it?"])
    mask = batch.attention_mask
    assert int(mask.sum(1).min()) < batch.seq_len  # the second row is left padded
    return batch


def _close_where_real(got, want, mask):
    """Max |difference| over real (not padding) positions."""
    return float((got - want).abs().amax(-1)[mask.bool()].max())


@pytest.mark.lookalike
@pytest.mark.parametrize("lookalike", (
    lookalikes.LLAVA15, *(pytest.param(n, marks=pytest.mark.slow) for n in (
        lookalikes.NEXT, lookalikes.QWEN25VL, lookalikes.ONEVISION))), indirect=True)
def test_continuing_from_any_position_and_layer_equals_the_full_pass(lookalike):
    vlm = lookalike
    batch = _padded(vlm)
    s = batch.seq_len
    keep = 8  # logits of the last 8 positions: every earlier key / value reaches them
    full = vlm.forward(batch, logits_to_keep=keep).logits
    rec = record(vlm, batch, residual_layers=[1], keep=keep)
    assert rec.reusable, rec.why_not
    torch.testing.assert_close(rec.logits, full, rtol=0, atol=TOL)
    first_image = int(np.flatnonzero(batch.input_ids[0].numpy() == vlm.image_token_id)[0])
    for p, layer in ((0, 0), (1, 1), (first_image, 0), (first_image + 7, 1), (s // 2, 1),
                     (s - 3, 0), (s - 1, 1)):
        source = rec.embeds if layer == 0 else rec.residual[layer]
        got = advance(vlm, rec.rows(2, p), source[:, p:], **rec.after(p), layer=layer,
                      keep=min(keep, s - p))
        torch.testing.assert_close(got, full[:, -got.shape[1]:], rtol=0, atol=TOL)


@pytest.mark.lookalike
def test_appended_tokens_continue_as_the_model_would(lookalike):
    """Text appended after a cached prompt (a question after a shared image, generated
    tokens) gets the positions the model gives it: mRoPE continues from its largest."""
    vlm = lookalike
    batch = _padded(vlm)
    extra = torch.tensor([11, 12, 13])
    want = vlm.forward(extend_batch(batch, extra), logits_to_keep=3).logits
    rec = record(vlm, batch)
    rows = rec.rows(2, batch.seq_len)
    got = advance(vlm, rows, embed(vlm, extra[None].expand(2, -1)), keep=3)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    # one more token, then only the second row (finished rows leave the batch)
    want2 = vlm.forward(extend_batch(batch, torch.cat([extra, torch.tensor([14])])),
                        logits_to_keep=1).logits
    advance(vlm, rows, embed(vlm, torch.tensor([[14], [14]])))
    second = rows.select([1])
    # a fork continues separately: the original rows are untouched by it
    more = second.fork()
    got2 = advance(vlm, more, embed(vlm, torch.tensor([[15]])))
    want3 = vlm.forward(extend_batch(batch, torch.tensor([11, 12, 13, 14, 15])),
                        logits_to_keep=1).logits
    torch.testing.assert_close(got2, want3[1:], rtol=0, atol=TOL)
    torch.testing.assert_close(rows.logits, want2, rtol=0, atol=TOL)
    assert second.length == batch.seq_len + 4 and more.length == batch.seq_len + 5


@pytest.mark.lookalike
def test_knockout_on_a_padded_batch_continues_from_its_first_blocked_query(lookalike):
    """Per-row edges on a left-padded batch: running from the first blocked query (of any
    row), from the window's first layer, equals the knocked-out full pass."""
    vlm = lookalike
    batch = _padded(vlm)
    s = batch.seq_len
    edges = []
    for b in range(2):
        image = batch.token_map.image_positions(b)
        edges.append((np.arange(image[-20], s), image[:30]))  # late image rows + text <- image
    with knock(vlm, edges, [1]):
        want = vlm.forward(batch, logits_to_keep=s).logits
    rec = record(vlm, batch, residual_layers=[1], keep=s)
    p = min(int(q.min()) for q, _ in edges)
    with knock(vlm, edges, [1], seq_len=s):
        got = advance(vlm, rec.rows(2, p), rec.residual[1][:, p:], **rec.after(p), layer=1,
                      keep=s - p)
    assert _close_where_real(got, want[:, p:], batch.attention_mask[:, p:]) < TOL
    assert _close_where_real(rec.logits[:, p:], want[:, p:], batch.attention_mask[:, p:]) > 1e-3


def _sweep_case(vlm, sample_seed: int = 3):
    """One knockout sweep as the experiment builds it: a prompt, a teacher-forced answer
    of three tokens, every condition of edge_sets, Neo's windows plus one per layer."""
    from vislens.data import shapesworld

    scene = shapesworld.make_scene(sample_seed, 0)
    one = vlm.prepare([scene.image], ["Is there a circle in this image?"])
    feats = vlm.image_embeddings(one)
    answer = torch.tensor([21, 22, 23])
    keep = len(answer)
    ext = extend_batch(one, answer[:-1])
    queries = np.arange(ext.seq_len - keep, ext.seq_len)
    target = max(range(len(scene.instances)), key=lambda i: scene.instances[i].area)
    edges = {c: (queries if isinstance(qs, str) else qs, ks) for c, (qs, ks) in
             knockout.edge_sets(one.token_map, one, 0, scene.instances[target].mask).items()}
    windows = knockout.knockout_windows(vlm.num_layers, "neo,sliding:1")
    grid = [(c, w) for c in edges for w in range(len(windows))]
    return ext, feats, edges, windows, grid, keep


def _full(vlm, ext, feats, edges, windows, grid, keep):
    out = []
    for c, w in grid:
        with knock(vlm, [edges[c]], range(windows[w][0], windows[w][1] + 1)):
            logits = vlm.forward(ext, image_features=feats, logits_to_keep=keep).logits
        out.append(torch.softmax(logits.float(), -1)[0])
    return torch.stack(out)


@pytest.mark.lookalike
@pytest.mark.parametrize("name", (lookalikes.LLAVA15, SLOW_NEXT,
                                  pytest.param(lookalikes.QWEN25VL, marks=pytest.mark.slow)))
def test_knockout_sweep_equals_the_full_recomputation_on_every_condition_and_window(
        name, monkeypatch):
    vlm = vislens.load(str(lookalikes.checkpoint_dir(name)))
    ext, feats, edges, windows, grid, keep = _sweep_case(vlm)
    _, rec = knockout.clean_pass(vlm, ext, feats, [s for s, _ in windows], keep=keep)
    assert rec.reusable
    got = knockout.sweep(vlm, ext, feats, edges, grid, windows, rec, keep=keep).log()
    want = _full(vlm, ext, feats, edges, windows, grid, keep).log()
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)  # log-probabilities
    assert torch.equal(got.argmax(-1), want.argmax(-1))  # verdicts identical
    clean = torch.log_softmax(rec.logits.float(), -1)[0]
    assert float((want - clean).abs().max()) > 1e-3  # the knockouts do change the answer
    # a first position one too late (the first blocked query taken as clean) is caught
    true_first = knockout.first_changed
    monkeypatch.setattr(knockout, "first_changed", lambda q, s: true_first(q, s) + 1)
    wrong = knockout.sweep(vlm, ext, feats, edges, grid, windows, rec, keep=keep).log()
    assert float((wrong - want).abs().max()) > 10 * TOL  # the comparison above would fail


@pytest.mark.slow
@pytest.mark.lookalike
@pytest.mark.parametrize("name", (lookalikes.GEMMA3, lookalikes.PALIGEMMA))
def test_families_whose_positions_see_later_ones_recompute_every_position(name):
    vlm = vislens.load(str(lookalikes.checkpoint_dir(name)))
    ext, feats, edges, windows, grid, keep = _sweep_case(vlm)
    _, rec = knockout.clean_pass(vlm, ext, feats, [s for s, _ in windows], keep=keep)
    assert not rec.reusable and "not causal" in rec.why_not
    with pytest.raises(ValueError, match="cannot be continued"):
        rec.rows(1, 5)
    got = knockout.sweep(vlm, ext, feats, edges, grid, windows, rec, keep=keep).log()
    want = _full(vlm, ext, feats, edges, windows, grid, keep).log()
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    # why: blocking the last image row's queries in layer 0 changes, by the output of layer
    # 1, positions BEFORE the first blocked query (they attend to it), so "nothing before
    # the first blocked query changes" is false here
    queries, keys = edges["object+1->last-row"]
    first, out = int(np.min(queries)), vlm.num_layers  # residual[L]: the last layer's output
    cols = [np.arange(first)]
    with capture(vlm, cols, layers=[out - 1]) as clean:
        vlm.forward(ext, image_features=feats, logits_to_keep=1)
    with knock(vlm, [(queries, keys)], [0]), capture(vlm, cols, layers=[out - 1]) as blocked:
        vlm.forward(ext, image_features=feats, logits_to_keep=1)
    assert float((clean.residual[out] - blocked.residual[out]).abs().max()) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ("toy", *(pytest.param(n, marks=pytest.mark.lookalike)
                                           for n in (lookalikes.LLAVA15, lookalikes.QWEN25VL))))
def test_knockout_rows_equal_those_of_generate_and_a_full_clean_pass(name):
    """The experiment's shortcut end to end: the clean answer decoded from the recorded
    prompt and the answer teacher-forced after it give the rows that generate + a full
    clean pass give (the path a family that refuses continuation takes)."""
    from answer_head import fitted_dir, scenes

    vlm = vislens.load("toy" if name == "toy" else str(fitted_dir(name)))
    if name == "toy":
        from vislens.data import shapesworld

        samples = shapesworld.generate(3, seed=1000)
    else:
        samples = scenes()[:2]
    config = knockout.KnockoutConfig()
    windows = config.layer_windows(vlm.num_layers)
    targets = knockout.choose_targets(samples, None)
    kept = 0
    for sample, target in zip(samples, targets, strict=True):
        for setting in config.settings:
            vlm.continuation_refused = ""
            got = list(knockout._sample_rows(vlm, sample, target, setting, config, windows))
            vlm.continuation_refused = "forced, to compare with the full path"
            want = list(knockout._sample_rows(vlm, sample, target, setting, config, windows))
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert {k: v for k, v in g.items() if not k.startswith("p_")} == \
                    {k: v for k, v in w.items() if not k.startswith("p_")}
                for k in (k for k in w if k.startswith("p_")):
                    assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6)
            kept += len(got) > 1
    vlm.continuation_refused = ""
    assert kept  # some sample was answered right, so its conditions were compared
