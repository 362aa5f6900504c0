"""Small statistics every experiment reports the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np


class Rate(TypedDict):
    """A share of yes / no outcomes as summaries store it (`rate`)."""

    rate: float | None  # None for no trials
    ci95: list[float] | None  # Wilson interval; None for no trials
    n: int  # trials


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate: stays informative at 0% and 100% (a bootstrap of
    n zeros collapses to [0, 0]); (nan, nan) for no trials."""
    if n <= 0:
        return (float("nan"), float("nan"))
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def rate(flags: Sequence[bool], level: float = 0.95) -> Rate:
    """A rate with its Wilson interval: {"rate", "ci95", "n"} (rate None for no trials)."""
    flags = [bool(f) for f in flags]
    n, k = len(flags), sum(flags)
    lo, hi = wilson_ci(k, n, level)
    return {"rate": k / n if n else None, "ci95": [lo, hi] if n else None, "n": n}


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; (nan, nan) for no data."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    return bootstrap_metric(list(x), lambda xs: float(np.mean(xs)), n_boot, seed, level)


def bootstrap_metric(items: Sequence, metric: Callable[[list], float], n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of any metric computed from resampled items (e.g. an
    mIoU pooled over items); (nan, nan) for no items."""
    items = list(items)
    if not items:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = [metric([items[i] for i in rng.integers(0, len(items), len(items))])
             for _ in range(n_boot)]
    draws = np.asarray([d for d in draws if d is not None and np.isfinite(d)], dtype=float)
    if draws.size == 0:
        return (float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
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


def bootstrap_columns(matrix, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                      ) -> np.ndarray:
    """Percentile bootstrap interval of every column's mean of an [items, k] matrix -> [k, 2].

    Items (e.g. images) are resampled together for all columns, as one draw of the
    data set, and NaN entries (a measure undefined for one item) are skipped; a
    column with no finite entry gets (nan, nan). Vectorised, so a per-layer
    curve of a 32-layer model costs one call, not one bootstrap per layer.
    """
    x = np.asarray(matrix, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"bootstrap_columns takes an [items, k] matrix, got shape {x.shape}")
    out = np.full((x.shape[1], 2), np.nan)
    if x.shape[0] == 0:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    tail = (1 - level) / 2 * 100
    for k in range(x.shape[1]):
        draws = x[idx, k]
        ok = np.isfinite(draws)
        counts = ok.sum(1)
        means = np.where(ok, draws, 0.0).sum(1) / np.maximum(counts, 1)
        means = means[counts > 0]
        if means.size:
            out[k] = np.percentile(means, [tail, 100 - tail])
    return out


def selection_split(strata: Sequence, seed: int = 0) -> tuple[list[int], list[int]]:
    """(selection, held-out) item indices: where a layer or anything else is chosen, and a
    disjoint half where the chosen thing is scored. One rule for B1 (perceive) and the
    B2 / B3 headlines, so they choose and score on the same items for the same seed.

    Stratified: the strata (e.g. classes) are taken in an order shuffled with `seed`, the
    items of each shuffled with it too, and dealt alternately to the two halves, selection
    first, the turn carrying over from one stratum to the next: every stratum with two
    items sits on both sides and the halves differ in size by at most one. Shuffling the
    strata's order keeps the split seeded where every item is its own stratum (temp-corr's
    videos): dealing them in name order would fix the halves by name whatever the seed.
    With one item there is nothing to choose on: it is held out and the selection half is
    empty. Deterministic in (strata, seed); independent of any score.
    """
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(str(s), []).append(i)
    names = sorted(groups)
    halves: tuple[list[int], list[int]] = ([], [])
    turn = 0
    for k in rng.permutation(len(names)).tolist():
        for i in rng.permutation(groups[names[k]]).tolist():
            halves[turn].append(int(i))
            turn ^= 1
    selection, held = sorted(halves[0]), sorted(halves[1])
    if not held:  # a single item: scored, nothing chosen
        return [], selection
    return selection, held


def choose_layer(scores: dict, by: str = "largest") -> int | None:
    """The layer of the best finite score (ties: the earliest layer); `by` = "largest"
    (highest value) or "largest-abs" (largest size, sign kept elsewhere). None if no layer
    has a finite score."""
    if by not in ("largest", "largest-abs"):
        raise ValueError(f"choose_layer by {by!r}: use 'largest' or 'largest-abs'")
    ok = [(float(v), ly) for ly, v in scores.items() if v is not None and np.isfinite(v)]
    if not ok:
        return None
    size = abs if by == "largest-abs" else float
    return max(ok, key=lambda vl: (size(vl[0]), -vl[1]))[1]


def paired_delta(n_items: int, metric: Callable[[list[int]], float | None],
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """A change measured on the same items twice (e.g. with / without a prefix) with its
    percentile bootstrap interval: `metric(indices)` gives after - before on those items,
    and the items are resampled together for both conditions (a paired bootstrap).
    Returns {"delta", "ci95", "n"} (None for no items or an undefined metric)."""
    idx = list(range(n_items))
    if not idx:
        return {"delta": None, "ci95": None, "n": 0}
    d = metric(idx)
    if d is None or not np.isfinite(d):
        return {"delta": None, "ci95": None, "n": n_items}
    lo, hi = bootstrap_metric(idx, metric, n_boot=n_boot, seed=seed, level=level)
    ci = None if not (np.isfinite(lo) and np.isfinite(hi)) else [round(lo, 4), round(hi, 4)]
    return {"delta": round(float(d), 4), "ci95": ci, "n": n_items}


def permutation_null(observed: float, draws: Sequence[float], level: float = 0.95) -> dict:
    """A statistic against its permutation distribution: the null's mean, its central
    `level` interval, and the one-sided p-value P(null >= observed) with the +1 correction
    (so never 0)."""
    d = np.asarray(draws, dtype=float)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(d, [tail, 100 - tail])
    p = (1 + int((d >= observed - 1e-12).sum())) / (1 + d.size)
    return {"mean": round(float(d.mean()), 4), "ci95": [round(float(lo), 4),
                                                        round(float(hi), 4)],
            "p_value": round(float(p), 4), "n_permutations": int(d.size)}
