"""`vislens patch` (experiments/patching.py): causal tracing on image tokens.

The experiment is checked where a wrong number would not show: restoring every column of a
layer's residual restores a share of 1 and restoring none 0 (its own rows, through its own
code path); the funnel counts its pair rows; a rerun resumes instead of recomputing; bad
input ends in one line. (The command on every look-alike's geometry: test_lookalikes_e2e.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import vislens
from vislens.cli import app
from vislens.data import open_dataset
from vislens.errors import VislensError
from vislens.experiments import patching

META = {"model": "toy", "data": "shapesworld:1000"}
SMALL = (0.0, 350.0)


@pytest.fixture(scope="module")
def toy():
    return vislens.load("toy")


@pytest.fixture(scope="module")
def scenes():
    return open_dataset("shapesworld:1000", n=6)


def _config(**kw) -> patching.PatchConfig:
    base = {"layers": "0,2", "token_layers": "1", "area": SMALL, "maps": 1}
    return patching.PatchConfig(**{**base, **kw})


def test_whole_layer_restores_one_and_nothing_restores_zero(toy, scenes, monkeypatch):
    """Through the experiment's own rows: a group of every column restores the residual's
    whole layer (share 1 up to float rounding of a batch of other size), an empty group
    nothing (share 0), at every layer."""
    def everything(vlm, batch, pair):
        return {"object": np.arange(batch.seq_len), "question": np.zeros(0, dtype=np.int64)}

    monkeypatch.setattr(patching, "groups", everything)
    sample = scenes[0]
    target = patching.choose_targets([sample], SMALL)[0]
    rows = patching.pair_rows(toy, sample, target, _config(layers="all", token_layers="none"),
                              list(range(toy.num_layers)), [])
    assert rows[0]["kept"], "the toy must answer this pair right clean and wrong corrupted"
    shares = {(r["layer"], r["group"]): r["share"] for r in rows[1:]}
    assert len(shares) == 2 * toy.num_layers
    for layer in range(toy.num_layers):
        assert shares[(layer, "object")] == pytest.approx(1.0, abs=1e-5)
        assert shares[(layer, "question")] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_groups_batched_as_rows_equal_each_group_patched_alone(toy, scenes):
    """Every group is a row of one corrupted batch; each row gives what a one-row batch
    restoring that group alone gives (a hand-written patch, outside the experiment)."""
    import torch

    from vislens.interventions.patch import logit_difference, patch, record_sites

    sample = scenes[0]
    target = patching.choose_targets([sample], SMALL)[0]
    config = _config(layers="1", token_layers="none")
    rows = patching.pair_rows(toy, sample, target, config, [1], [])
    head = rows[0]
    pair = patching.make_pair(toy, sample, target, config)
    clean = toy.prepare([pair.clean], [pair.question.prompt], [pair.prefix])
    corrupt = toy.prepare([pair.corrupt], [pair.question.prompt], [pair.prefix])
    source = record_sites(toy, clean, [("residual", 1)], logits_to_keep=1)
    metric = logit_difference(head["answer_id"], head["foil_id"])
    cols = patching.groups(toy, clean, pair)
    for row in rows[1:]:
        with patch(toy, source, corrupt, [("residual", 1)], [cols[row["group"]]]), \
                torch.no_grad():
            ld = float(metric(toy.forward(corrupt, logits_to_keep=1).logits.float()))
        assert row["ld"] == pytest.approx(ld, abs=1e-4), row["group"]


def test_groups_are_the_knockout_token_sets(toy, scenes):
    """object / object+1 / last row as knockout builds them; the rest is the image minus
    object+1; the answer position is the last column."""
    sample = scenes[0]
    target = patching.choose_targets([sample], SMALL)[0]
    pair = patching.make_pair(toy, sample, target, _config())
    batch = toy.prepare([pair.clean], [pair.question.prompt], [pair.prefix])
    g = patching.groups(toy, batch, pair)
    tm = batch.token_map
    image = tm.image_positions(0)
    assert set(g["object"]) <= set(g["object+1"]) <= set(image)
    assert set(g["rest-of-image"]) | set(g["object+1"]) == set(image)
    assert not set(g["rest-of-image"]) & set(g["object+1"])
    assert g["answer-position"].tolist() == [batch.seq_len - 1]
    words = toy.tokenizer.convert_ids_to_tokens(batch.input_ids[0, g["question"]].tolist())
    assert words == pair.question.prompt.split()[:-1]  # the question's words, not "?"


def test_first_token_is_the_word_after_the_prefix(toy):
    red = patching.first_token(toy, "what color is the circle ?", "it is", "red")
    assert toy.tokenizer.convert_ids_to_tokens([red]) == ["red"]


@pytest.mark.slow
def test_funnel_counts_its_pair_rows_and_resume_recomputes_nothing(toy, scenes, tmp_path,
                                                                   monkeypatch):
    config = _config()
    first = patching.execute(toy, scenes, config, tmp_path, META)
    counts = first["funnel"]["counts"]["color"]
    pairs = [r for r in pq.read_table(tmp_path / "rows.parquet").to_pylist() if r["kind"] == "pair"]
    assert counts["read"] == len(scenes)
    assert counts["selected"] == len(pairs)
    assert counts["paired"] == sum(r["paired"] for r in pairs)
    assert counts["clean_correct"] == sum(r["clean_correct"] for r in pairs)
    assert counts["kept"] == first["n_pairs"] == sum(r["kept"] for r in pairs) > 0
    assert counts["read"] >= counts["selected"] >= counts["paired"] >= counts["clean_correct"] \
        >= counts["corrupt_wrong"] >= counts["kept"]
    assert set(first["restored"]) == {"residual"} and first["layers"] == [0, 2]
    att = first["attribution"]
    assert set(att) == {"residual"} and set(att["residual"]) == {"1"}
    assert att["residual"]["1"]["n"] == counts["kept"]
    assert first["reference"] == {"nothing": 0.0, "everything": 1.0}
    assert len(first["maps"]) == len(first["viewers"]) == 1

    def boom(*args, **kwargs):
        raise AssertionError("a resumed run recomputed a pair")

    monkeypatch.setattr(patching, "_unit", boom)
    again = patching.execute(toy, scenes, config, tmp_path, META)
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)


def test_one_line_errors(toy, scenes, tmp_path):
    with pytest.raises(ValueError, match="unknown --kinds"):
        _config(kinds=("resid",)).validate()
    with pytest.raises(ValueError, match="unknown --corrupt"):
        _config(corrupt="blur").validate()
    with pytest.raises(ValueError, match="unknown --groups objects; choose from object, "):
        _config(groups=("objects",)).validate()
    with pytest.raises(ValueError, match="this model has layers 0..3"):
        patching.execute(toy, scenes[:1], _config(layers="0-9"), tmp_path / "a", META)
    with pytest.raises(ValueError, match="--token-layers"):
        patching.execute(toy, scenes[:1], _config(token_layers="7"), tmp_path / "b", META)
    other = scenes[0].__class__(**{**scenes[0].__dict__, "meta": {"source": "coco"}})
    with pytest.raises(VislensError, match="use --corrupt noise"):
        patching.execute(toy, [other], _config(), tmp_path / "c", META)
    assert not (tmp_path / "c").exists()


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.slow
def test_cli_help_json_and_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["patch", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "Example: vislens patch" in result.output
    assert "--json" in result.output
    assert "--corrupt noise" in _one_line_error(runner.invoke(
        app, ["patch", "--data", f"coco:{tmp_path}", "--corrupt", "shape"]))
    assert "--kinds" in _one_line_error(runner.invoke(app, ["patch", "--kinds", "x"]))
    result = runner.invoke(app, ["patch", "--n", "3", "--layers", "1", "--token-layers", "none",
                                 "--kinds", "residual,mlp", "--corrupt", "noise", "--maps", "0",
                                 "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert set(s["restored"]) == {"residual", "mlp"} and s["corrupt"] == "noise"
    assert s["funnel"]["counts"]["noise"]["read"] == 3
    assert set(s["plots"]) == ({"residual", "mlp"} if s["n_pairs"] else set())


@pytest.mark.slow
def test_exact_tokens_caps_the_one_token_patches_evenly(toy, scenes):
    """Above `exact_tokens` image tokens, exact patching runs on that many tokens evenly
    spaced in token order (NaN on the others), with the values of the uncapped run on
    those tokens; attribution still covers every image token."""
    sample = scenes[0]
    target = patching.choose_targets([sample], SMALL)[0]
    layers = list(range(toy.num_layers))
    full = patching.pair_rows(toy, sample, target, _config(token_layers="1"), layers, [1])
    capped = patching.pair_rows(toy, sample, target, _config(token_layers="1", exact_tokens=10),
                                layers, [1])
    whole = next(r for r in full if r["kind"] == "token")
    part = next(r for r in capped if r["kind"] == "token")
    assert part["positions"] == whole["positions"]
    assert part["estimate"] == pytest.approx(whole["estimate"], abs=1e-6)
    exact = np.asarray(part["exact"])
    measured = np.flatnonzero(np.isfinite(exact))
    assert len(measured) == 10 < len(exact) and np.isfinite(whole["exact"]).all()
    steps = np.diff(measured)
    assert steps.max() - steps.min() <= 1 and measured[0] == 0 and measured[-1] == len(exact) - 1
    assert exact[measured] == pytest.approx(np.asarray(whole["exact"])[measured], abs=1e-5)
    assert part["topk_restored"] == pytest.approx(whole["topk_restored"], abs=1e-5)
    with pytest.raises(ValueError, match="--exact-tokens must be at least 2"):
        _config(exact_tokens=1).validate()


@pytest.mark.slow
def test_token_rows_of_every_kind_are_single_token_patches_of_that_site(toy, scenes):
    """With --kinds residual,attn,mlp each site kind has its token rows; an attn / mlp
    token's exact share is the share of restoring that site at that one column (a one-row
    group patch through the experiment's own code path), and every site's attribution
    estimate covers every image token."""
    sample = scenes[0]
    target = patching.choose_targets([sample], SMALL)[0]
    config = _config(kinds=("residual", "attn", "mlp"), token_layers="2", exact_tokens=6)
    rows = patching.pair_rows(toy, sample, target, config, [2], [2])
    tokens = {r["group"]: r for r in rows if r["kind"] == "token"}
    assert set(tokens) == {"residual", "attn", "mlp"}
    for kind, r in tokens.items():
        exact = np.asarray(r["exact"])
        i = int(np.flatnonzero(np.isfinite(exact))[2])
        one = _single_column(toy, sample, target, kind, r["positions"][i])
        assert exact[i] == pytest.approx(one, abs=1e-5), kind
        assert len(r["estimate"]) == len(r["positions"]) and np.isfinite(r["estimate"]).all()
    assert tokens["attn"]["exact"] != tokens["mlp"]["exact"]


def _single_column(vlm, sample, target, kind: str, column: int) -> float:
    """The share restored by `kind` of layer 2 at one column, patched by hand."""
    import torch

    from vislens.interventions.patch import logit_difference, patch, record_sites, restored_share

    config = _config()
    pair = patching.make_pair(vlm, sample, target, config)
    q = pair.question
    clean = vlm.prepare([pair.clean], [q.prompt], [pair.prefix])
    corrupt = vlm.prepare([pair.corrupt], [q.prompt], [pair.prefix])
    metric = logit_difference(patching.first_token(vlm, q.prompt, pair.prefix, q.answer),
                              patching.first_token(vlm, q.prompt, pair.prefix, pair.foil))
    source = record_sites(vlm, clean, [(kind, 2)], logits_to_keep=1)
    with torch.no_grad():
        ld_clean = float(metric(source.logits.float()))
        ld_corrupt = float(metric(vlm.forward(corrupt, logits_to_keep=1).logits.float()))
        with patch(vlm, source, corrupt, [(kind, 2)], [[column]]):
            ld = float(metric(vlm.forward(corrupt, logits_to_keep=1).logits.float()))
    return float(restored_share(ld, ld_clean, ld_corrupt))


@pytest.mark.slow
def test_continued_and_whole_pass_rows_agree(toy, scenes, monkeypatch):
    """The experiment's rows from the recorded corrupted pass (patch_continued, the toy's
    default) equal those of whole patched passes (what families that cannot be continued
    run): every group, layer and kind, and every single token."""
    sample = scenes[0]
    target = patching.choose_targets([sample], SMALL)[0]
    config = _config(kinds=("residual", "attn", "mlp"), layers="all", token_layers="0,3")
    layers = list(range(toy.num_layers))
    seen = []
    real = patching.record

    def watched(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(patching, "record", watched)
    continued = patching.pair_rows(toy, sample, target, config, layers, [0, 3])
    assert seen, "the toy's corrupted pass must be recorded and continued"
    monkeypatch.setattr(patching, "refused", lambda vlm: "forced for the test")
    whole = patching.pair_rows(toy, sample, target, config, layers, [0, 3])
    assert len(seen) == 1 and len(continued) == len(whole) > 1 + 3 * 4 * 6
    for a, b in zip(continued, whole, strict=True):
        assert (a["kind"], a["layer"], a["group"]) == (b["kind"], b["layer"], b["group"])
        for key in ("ld", "share", "topk_restored"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["kind"], a["layer"], key)
        if a["kind"] == "token":
            assert a["exact"] == pytest.approx(b["exact"], abs=1e-4)


def _price(groups, starts, end: int, cost: int) -> int:
    return sum(len(g) * (end - min(starts[i] for i in g)) + cost for g in groups)


def test_start_groups_is_the_cheapest_partition_within_max_rows():
    """The grouping of rows by first changed column: against every partition of the sorted
    rows (brute force), with and without a row cap."""
    import itertools

    from vislens.experiments.batching import start_groups

    rng = np.random.default_rng(0)
    for _ in range(20):
        starts = rng.integers(0, 40, size=6).tolist()
        end, cost = 50, int(rng.integers(0, 30))
        order = sorted(range(6), key=lambda i: starts[i])
        for cap in (None, 2):
            got = start_groups(starts, end, cost, max_rows=cap)
            assert sorted(i for g in got for i in g) == list(range(6))
            assert all(cap is None or len(g) <= cap for g in got)
            spans = [list(zip((0, *cuts), (*cuts, 6)))
                     for k in range(6) for cuts in itertools.combinations(range(1, 6), k)]
            best = min(_price([order[a:b] for a, b in s], starts, end, cost) for s in spans
                       if cap is None or all(b - a <= cap for a, b in s))
            assert _price(got, starts, end, cost) == best
