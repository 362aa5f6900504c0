"""The plots each experiment saves as PNG (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# readable in a browser at 100% zoom; one colour per source in every figure
plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
                     "legend.fontsize": 9, "xtick.labelsize": 10, "ytick.labelsize": 10})
SOURCE_COLORS = {"values": "C0", "keys": "C1", "keys-pre": "C4", "projector": "C2",
                 "vision": "C3", "chance": "0.5", "model": "C5"}


def source_color(name: str) -> str | None:
    """The colour of a source whatever the figure: 'values (prefix)' is a values curve."""
    base = name.split(" (")[0].split(" readout")[0].split(" ")[0]
    return SOURCE_COLORS.get(base)


def save_figure(fig, path: Path) -> Path:
    """Write a PNG atomically (never half a file) and free the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def grouped_bars(values: Mapping[str, Mapping[str, float]], path: Path, title: str,
                 ylabel: str, errors: Mapping[str, Mapping[str, Sequence[float]]] | None = None
                 ) -> Path:
    """values[group][bar] -> height; one bar cluster per group (e.g. setting x condition)."""
    groups = list(values)
    bars = list(dict.fromkeys(b for g in groups for b in values[g]))
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(bars) * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(bars))
    for i, g in enumerate(groups):
        h = [values[g].get(b, np.nan) for b in bars]
        yerr = None
        if errors is not None and g in errors:
            lo = [h[j] - errors[g].get(b, (np.nan, np.nan))[0] for j, b in enumerate(bars)]
            hi = [errors[g].get(b, (np.nan, np.nan))[1] - h[j] for j, b in enumerate(bars)]
            yerr = np.clip(np.array([lo, hi], dtype=float), 0, None)
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, h, width, label=g, yerr=yerr, capsize=2)
    ax.set_xticks(x, bars, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def heatmap(matrix: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str],
            path: Path, title: str, cbar: str, vmin: float | None = None,
            vmax: float | None = None) -> Path:
    data = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(cols) + 3), max(3, 0.45 * len(rows) + 1.5)))
    im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(data):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9,
                    color="w" if v < np.nanmean(data) else "k")
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_title(title)
    return save_figure(fig, path)


def layer_curves(curves: Mapping[str, Sequence[float]], path: Path, title: str, ylabel: str,
                 hlines: Mapping[str, float] | None = None,
                 styles: Mapping[str, str] | None = None,
                 bands: Mapping[str, Sequence[Sequence[float]]] | None = None,
                 ylim: tuple[float, float] | None = None, legend_below: bool = False) -> Path:
    """One line per source over layers; constant baselines (projector, vision) as dashes.

    Sources keep their colour across figures (SOURCE_COLORS); `styles` gives a line
    style per curve (e.g. dotted for the prefixed condition); bands[name] = per-layer
    (low, high) interval, shaded in its curve's colour. The legend sits outside the
    axes (right, or below with legend_below) so it never hides data; `ylim` fixes the
    range (shares of attention run from 0 to 1 and leave no free corner).
    """
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for k, (name, ys) in enumerate(curves.items()):
        color = source_color(name) or f"C{k}"
        ax.plot(range(len(ys)), ys, marker="o", ms=4, label=name, color=color,
                ls=(styles or {}).get(name, "-"))
        if bands and name in bands:
            lo, hi = np.asarray(bands[name], dtype=float).reshape(-1, 2).T
            ax.fill_between(range(len(lo)), lo, hi, color=color, alpha=0.2, lw=0)
    for k, (name, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, ls="--", color=source_color(name) or f"C{len(curves) + k}",
                   label=name)
    ax.set_xlabel("LM layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend_below:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18),
                  ncol=min(3, len(curves) + len(hlines or {})), frameon=False)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return save_figure(fig, path)
