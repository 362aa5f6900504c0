"""The loss curve and held-out probe accuracy of a toy training run, as one PNG.

Both trainers write it next to their checkpoint, so a person can see where a
run stalled (which stage, which setting) without reading the JSON log.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vislens.data.samples import SETTINGS


def plot_training(log: dict, path: Path, title: str) -> None:
    """Loss per stage (raw and smoothed) and the probe accuracy per setting, stage by stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    offset = 0
    for stage in dict.fromkeys(r["stage"] for r in log["steps"]):
        rows = [r for r in log["steps"] if r["stage"] == stage]
        x = np.arange(offset, offset + len(rows))
        y = np.array([r["loss"] for r in rows])
        k = min(20, len(y))
        ax.plot(x, y, alpha=0.25)
        ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), label=f"stage {stage}")
        probes = [p for p in log["probes"] if p["stage"] == stage]
        for i, setting in enumerate(SETTINGS):  # one colour per setting across stages
            ax_acc.plot([offset + p["step"] for p in probes], [p[setting] for p in probes],
                        marker="o", ms=3, color=f"C{i}", label=setting if offset == 0 else None)
        if offset:
            ax_acc.axvline(offset, color="0.7", lw=0.8, ls="--")
        ax_acc.text(offset, 1.03, stage, fontsize=8)
        offset += len(rows)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax_acc.set_ylim(0, 1.1)
    ax_acc.set_xlim(0, max(offset, 1))  # keeps the stage names inside the axes
    ax_acc.set_xlabel("step")
    ax_acc.set_title("held-out exact match (teacher forced)")
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=120)
    plt.close(fig)
