"""Liu et al. B3: a short text BEFORE the image, and what it does to perception.

Image tokens come before the text in these causal LMs, so their keys / values can
only be changed by text placed ahead of them. The same items are scored twice,
without and with the prefix (the task, the class list, or the user's text: see
perceive.prefix_text), and the change is reported per task and layer. The
projector and vision-encoder baselines cannot change (they never see the text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace

from vislens.experiments.perception import perceive
from vislens.experiments.perception.artifacts import delta


def run(vlm, config: perceive.PerceiveConfig, out, progress: Callable | None = None) -> dict:
    if not config.prefix:
        raise ValueError("give a prefix: --prefix task, --prefix classes or --prefix 'any text'")
    items = {t: perceive.load_items(t, config) for t in perceive.check_tasks(config.tasks)}
    clean = perceive.run(vlm, replace(config, prefix=None), out, progress, condition="clean",
                         items=items)
    prefixed = perceive.run(vlm, config, out, progress, condition="prefix", items=items)
    return {"prefix": config.prefix, "clean": clean, "prefixed": prefixed,
            "delta": delta(clean, prefixed)}


def execute(vlm, config: perceive.PerceiveConfig, out, meta: dict,
            progress: Callable | None = None) -> dict:
    """Run into directory `out` (resuming), plot clean vs prefixed, write summary.json."""
    from vislens.experiments.perception.plots import compare_curves
    from vislens.experiments.runs import RunDir

    run_dir = RunDir(out, {"experiment": "prefix", **meta, **asdict(config)},
                     key=["condition", "task", "item"])
    summary = run(vlm, config, run_dir, progress)
    summary["plots"] = [str(p) for p in compare_curves(
        summary["clean"], summary["prefixed"], run_dir.path, ("clean", "prefix"))]
    run_dir.write_summary(summary)
    return summary
