"""Small statistics every experiment reports the same way."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; (nan, nan) for no data."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))


def layer_windows(n_layers: int, size: int | None = None,
                  stride: int | None = None) -> list[tuple[int, int]]:
    """Inclusive [start, end] windows covering the LM's layers.

    Defaults scale the protocol's 10-layer windows with stride 5 on a 32-layer
    LLaVA to the model's depth; the last window is shifted to end at the last
    layer so no layer is left out.
    """
    if n_layers < 1:
        raise ValueError(f"a model needs at least one layer, got {n_layers}")
    size = size if size is not None else max(1, round(n_layers * 10 / 32))
    stride = stride if stride is not None else max(1, round(n_layers * 5 / 32))
    if size < 1 or stride < 1:
        raise ValueError("--window and --stride must be at least 1")
    size = min(size, n_layers)
    windows = [(s, s + size - 1) for s in range(0, n_layers - size + 1, stride)]
    if windows[-1][1] != n_layers - 1:
        windows.append((n_layers - size, n_layers - 1))
    return windows
