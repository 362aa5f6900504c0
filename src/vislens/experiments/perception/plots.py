"""Figures of the perception experiments: per-task layer curves and the artifact grid."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vislens.render.plots import layer_curves, save_figure  # noqa: E402


def task_curves(summary: dict, out_dir: Path, suffix: str = "") -> list[Path]:
    """One line plot per task: keys / values over layers, projector / vision and the best
    chance level as dashes, all on the same (held-out) items."""
    paths = []
    for task, entry in summary.items():
        curves = {kind: [np.nan if v is None else v for v in entry[kind]]
                  for kind in ("keys", "keys-pre", "values") if kind in entry}
        hlines = {name: entry[name] for name in ("projector", "vision")
                  if entry.get(name) is not None}
        chance = [v for v in (entry.get("chance") or {}).values() if v is not None]
        if chance:
            hlines["chance"] = max(chance)
        n = f", {entry['n_heldout']} held-out items" if "n_heldout" in entry else ""
        level = f" ({entry['level']} level{n})" if "level" in entry else ""
        paths.append(layer_curves(curves, Path(out_dir) / f"{task}{suffix}.png",
                                  title=f"{task}{suffix.replace('-', ' ')}: "
                                        f"{entry['metric']} per LM layer{level}",
                                  ylabel=entry["metric"], hlines=hlines))
    return paths


def compare_curves(before: dict, after: dict, out_dir: Path, labels: tuple[str, str]
                   ) -> list[Path]:
    """Per task: values and keys curves of two conditions (e.g. clean vs prefix)."""
    paths = []
    for task, b in before.items():
        a = after.get(task)
        if a is None:
            continue
        curves, styles = {}, {}
        for kind in [k for k in ("values", "keys") if k in b]:
            for label, entry, style in zip(labels, (b, a), ("-", ":"), strict=True):
                name = f"{kind} ({label})"
                curves[name] = [np.nan if v is None else v for v in entry[kind]]
                styles[name] = style
        hlines = {n: b[n] for n in ("projector", "vision") if b.get(n) is not None}
        paths.append(layer_curves(curves, Path(out_dir) / f"{task}-{labels[1]}.png",
                                  title=f"{task}: {labels[0]} vs {labels[1]}",
                                  ylabel=b["metric"], hlines=hlines, styles=styles))
    return paths


def artifact_grid(art, path: Path) -> Path:
    """Scores per position on the image-token grid, one panel per layer; flagged = x."""
    layers = sorted(art.scores)
    cols_n = min(4, len(layers))
    rows_n = (len(layers) + cols_n - 1) // cols_n
    fig, axes = plt.subplots(rows_n, cols_n, figsize=(3.2 * cols_n, 3 * rows_n), squeeze=False)
    h, w = int(art.rows.max()) + 1, int(art.cols.max()) + 1
    for ax, layer in zip(axes.ravel(), layers, strict=False):
        grid = np.full((h, w), np.nan)
        grid[art.rows, art.cols] = art.scores[layer]
        im = ax.imshow(np.clip(grid, 0, 1), vmin=0, vmax=1, cmap="magma")
        idx = art.flagged[layer]
        ax.scatter(art.cols[idx], art.rows[idx], marker="x", c="cyan", s=18)
        ax.set_title(f"layer {layer}: {len(idx)} flagged", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(layers):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="input-agnostic score")
    return save_figure(fig, path)


def surface_plot(summary: Mapping[str, Any], path: Path) -> Path:
    """Held-out readout accuracy of image values per layer; model / baselines as dashes."""
    per_layer = summary["heldout_values_accuracy"]
    hlines = {"model (scored half)": summary["model_accuracy"]["rate"],
              "projector readout": (summary.get("projector_accuracy") or {}).get("rate"),
              "vision readout": (summary.get("vision_accuracy") or {}).get("rate"),
              "chance": summary.get("chance_accuracy")}
    return layer_curves({"values readout (held-out half)": list(per_layer.values())},
                        Path(path), title=f"surface: {summary['kind']}", ylabel="accuracy",
                        hlines={k: v for k, v in hlines.items() if v is not None})
