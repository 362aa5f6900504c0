"""What perceive, prefix, artifacts and surface share: options, loading, tables.

Tables fit 80 columns: one row per task, the held-out layer choice beside the
baselines, and per-layer curves as their own table with labelled layer columns
(at most MAX_LAYER_COLUMNS of them, evenly spaced).
"""

from __future__ import annotations

import numpy as np
from rich.table import Table

from vislens.cli.common import fmt, positive
from vislens.errors import VislensError

DATA_HELP = ("data spec for every task (shapesworld, shapesworld:SEED; default the held-out "
             "world 1000) or TASK=SPEC for one task in its native format (fg-seg=voc:DIR, "
             "co-seg=voc:DIR, sem-seg=imagenet-s:DIR, ref-seg=refcoco:DIR, "
             "sem-corr=spair:DIR, temp-corr=davis:DIR, mc=blink:FILE, images=coco:DIR); "
             "repeat the option for several")
LAYERS_HELP = "LM layers to read: all, or a comma list like 0,8,16 (fewer layers = less memory)"
TASKS_HELP = "comma list of tasks: fg-seg, co-seg, sem-seg, ref-seg, sem-corr, temp-corr"
ALL_TASKS = "fg-seg,co-seg,sem-seg,ref-seg,sem-corr,temp-corr"
DATA_PARTS = ("fg-seg", "co-seg", "sem-seg", "ref-seg", "sem-corr", "temp-corr", "images", "mc")
MAX_LAYER_COLUMNS = 8


def parse_layers(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() in ("", "all"):
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise VislensError(f"--layers must be 'all' or integers like 0,4,8; got {text!r}") from None


def parse_data(specs: list[str] | None) -> dict[str, str]:
    """--data entries -> {task or "*": spec}; ShapesWorld defaults to its held-out world."""
    out: dict[str, str] = {"*": "shapesworld"}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        key, value = (key.strip(), value.strip()) if sep else ("*", spec.strip())
        if key not in (*DATA_PARTS, "*"):
            raise VislensError(f"--data {spec!r}: unknown part {key!r}; use SPEC or TASK=SPEC "
                               f"with TASK one of {', '.join(DATA_PARTS)}")
        out[key] = value
    return out


def parse_sources(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def check_layers(vlm, layers) -> None:
    if layers is not None:
        bad = [x for x in layers if not 0 <= x < vlm.num_layers]
        if bad:
            raise VislensError(f"--layers {bad} out of range 0..{vlm.num_layers - 1}")


def perceive_config(tasks: str, data, seed: int, n: int, layers: str, batch_size: int,
                    prefix: str | None = None, sem_seg_oracle: bool = True,
                    text_token: str = "mean", similarity: str = "cosine"):
    from vislens.experiments.perception.perceive import PerceiveConfig, check_config, check_tasks

    positive("--n", n)
    positive("--batch-size", batch_size)
    return check_config(PerceiveConfig(
        tasks=check_tasks([t.strip() for t in tasks.split(",") if t.strip()]),
        data=parse_data(data), n=n, layers=parse_layers(layers), seed=seed,
        batch_size=batch_size, prefix=prefix, sem_seg_oracle=sem_seg_oracle,
        text_token=text_token, similarity=similarity))


def meta(model: str, vlm) -> dict:
    return {"model": model, "num_layers": vlm.num_layers}


def _held(entry: dict, kind: str) -> str:
    sel = entry.get("selected", {}).get(kind)
    if sel is None or sel["score"] is None:
        return "-"
    return f"{sel['score']:.3f} L{sel['layer']}"


def _chance(entry: dict) -> str:
    from vislens.experiments.perception.perceive import best_chance

    level = best_chance(entry)
    return "-" if level is None else fmt(level)


def _count(entry: dict) -> str:
    if "n_heldout" not in entry:
        return str(entry.get("n", "-"))
    return f"{entry['n_selection']}/{entry['n_heldout']}"


def perception_table(summary: dict, title: str) -> Table:
    """One row per task, every number on the same held-out items: values at the layer
    chosen on the selection half, the projector and vision-encoder baselines, the best
    trivial predictor (chance) and the item counts (selection / held-out). Keys at their
    chosen layer are in the JSON summary (`selected.keys`) and the per-layer table."""
    table = Table(title=title, caption="pixel level; Lx = layer chosen on the selection half; "
                  "every score on the held-out half; n = selection/held-out items")
    for col in ("task", "metric", "values", "projector", "vision", "chance", "n"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right",
                         no_wrap=True)
    for task, e in summary.items():
        table.add_row(task, e["metric"], _held(e, "values"), fmt(e["projector"]),
                      fmt(e["vision"]), _chance(e), _count(e))
    return table


def layer_table(summary: dict, title: str, kinds=("values", "keys"), signed: bool = False
                ) -> Table:
    """Per-layer curves, rows = task x kind, columns = labelled layers (evenly subsampled)."""
    first = next(iter(summary.values()), {"layers": []})
    layers = list(first["layers"])
    pick = sorted(set(np.linspace(0, len(layers) - 1, min(len(layers), MAX_LAYER_COLUMNS))
                      .round().astype(int).tolist())) if layers else []
    table = Table(title=title)
    table.add_column("task / source", no_wrap=True)
    for i in pick:
        table.add_column(f"L{layers[i]}", justify="right", no_wrap=True)
    for task, e in summary.items():
        for kind in kinds:
            if kind in e:
                values = [e[kind][i] for i in pick]
                cells = [("-" if v is None else f"{v:+.2f}") if signed else fmt(v, 2)
                         for v in values]
                table.add_row(f"{task} {kind}", *cells)
    return table
