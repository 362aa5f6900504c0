import numpy as np
import pytest

from vislens.experiments.stats import bootstrap_ci, layer_windows


def test_windows_reproduce_protocol_scale():
    w = layer_windows(32)
    assert w[0] == (0, 9) and w[-1] == (22, 31)
    assert all(e - s == 9 for s, e in w)
    covered = {layer for s, e in w for layer in range(s, e + 1)}
    assert covered == set(range(32))


def test_windows_small_models_and_custom():
    assert layer_windows(4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_windows(6, size=4, stride=3) == [(0, 3), (2, 5)]
    with pytest.raises(ValueError):
        layer_windows(0)


def test_bootstrap_brackets_mean_and_degenerate_cases():
    x = np.r_[np.ones(30), np.zeros(70)]
    lo, hi = bootstrap_ci(x)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert all(np.isnan(bootstrap_ci([])))


def test_selection_split_is_stratified_disjoint_and_seeded():
    from vislens.experiments.stats import selection_split

    classes = ["a"] * 6 + ["b"] * 4 + ["c"]
    sel, ev = selection_split(classes, seed=3)
    assert set(sel).isdisjoint(ev) and sorted(sel + ev) == list(range(len(classes)))
    assert abs(len(sel) - len(ev)) <= 1
    for c in ("a", "b"):  # every class with two items sits on both sides, half each
        on = [i for i, k in enumerate(classes) if k == c]
        assert len(set(on) & set(sel)) == len(on) // 2
    assert selection_split(classes, seed=3) == (sel, ev)  # deterministic
    assert selection_split(classes, seed=4) != (sel, ev)  # and seeded


def test_choose_layer_and_paired_delta():
    from vislens.experiments.stats import choose_layer, paired_delta

    assert choose_layer({0: 0.1, 1: -0.5, 2: 0.3}) == 2
    assert choose_layer({0: 0.1, 1: -0.5, 2: 0.3}, by="largest-abs") == 1
    assert choose_layer({0: 0.2, 1: 0.2}) == 0 and choose_layer({0: None}) is None
    after, before = np.r_[np.ones(20), np.zeros(20)], np.zeros(40)
    d = paired_delta(40, lambda idx: float(after[idx].mean() - before[idx].mean()), seed=1)
    assert d["delta"] == 0.5 and d["n"] == 40 and d["ci95"][0] < 0.5 < d["ci95"][1]
    assert d == paired_delta(40, lambda idx: float(after[idx].mean() - before[idx].mean()),
                             seed=1)
    assert paired_delta(0, lambda idx: 0.0) == {"delta": None, "ci95": None, "n": 0}


def test_permutation_null_p_value():
    from vislens.experiments.stats import permutation_null

    draws = np.linspace(0, 1, 99)
    assert permutation_null(2.0, draws)["p_value"] == 0.01  # +1 correction: never 0
    null = permutation_null(0.5, draws)
    assert 0.4 < null["p_value"] < 0.6 and null["n_permutations"] == 99
    assert null["ci95"][0] < 0.5 < null["ci95"][1]
