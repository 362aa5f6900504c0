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
