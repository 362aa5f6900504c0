"""Commands of the Liu et al. experiments: perceive, artifacts, prefix, surface.

Plain functions with typer options; cli.py registers them
(`app.command("perceive")(perceive)`, ...). Each writes a resumable run directory
(config.json, rows.parquet, summary.json, PNG plots) and prints a table, or the
summary as JSON with --json.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli_common import (
    DTYPE_HELP,
    JSON_HELP,
    MODEL_HELP,
    console,
    emit,
    positive,
    progress,
    user_errors,
)
from vislens.errors import VislensError

DATA_HELP = ("data spec for every task (shapesworld, shapesworld:SEED) or TASK=SPEC for one "
             "task in its native format (fg-seg=voc:DIR, co-seg=voc:DIR, sem-seg=imagenet-s:DIR, "
             "ref-seg=refcoco:DIR, sem-corr=spair:DIR, temp-corr=davis:DIR, mc=blink:FILE, "
             "images=coco:DIR); repeat the option for several")
LAYERS_HELP = "LM layers to read: all, or a comma list like 0,8,16 (fewer layers = less memory)"
TASKS_HELP = "comma list of tasks: fg-seg, co-seg, sem-seg, ref-seg, sem-corr, temp-corr"


def _layers(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() in ("", "all"):
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise VislensError(f"--layers must be 'all' or integers like 0,4,8; got {text!r}") from None


def _data(specs: list[str] | None) -> dict[str, str]:
    """--data entries -> {task or "*": spec}; ShapesWorld defaults to its held-out world."""
    out: dict[str, str] = {"*": "shapesworld"}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        key, value = (key.strip(), value.strip()) if sep else ("*", spec.strip())
        known = ("fg-seg", "co-seg", "sem-seg", "ref-seg", "sem-corr", "temp-corr", "images",
                 "mc", "*")
        if key not in known:
            raise VislensError(f"--data {spec!r}: unknown part {key!r}; use SPEC or TASK=SPEC "
                               f"with TASK one of {', '.join(known[:-1])}")
        out[key] = value
    return out


def _sources(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _load(model: str, device: str, dtype: str | None):
    from vislens.models import load

    return load(model, device=device, dtype=dtype)


def _check_layers(vlm, layers) -> None:
    if layers is not None:
        bad = [x for x in layers if not 0 <= x < vlm.num_layers]
        if bad:
            raise VislensError(f"--layers {bad} out of range 0..{vlm.num_layers - 1}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _curve(xs) -> str:
    return " ".join(_fmt(x) for x in xs)


def perception_table(summary: dict, title: str) -> Table:
    """Task x source: the held-out layer choice, the upper bound, the baselines."""
    table = Table(title=title)
    for col in ("task", "metric", "values (held-out)", "keys (held-out)",
                "values (upper bound)", "projector", "vision"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")

    def held(e, kind):
        sel = e.get("selected", {}).get(kind)
        if sel is None or sel["score"] is None:
            return "-"
        return f"{sel['score']:.3f} (L{sel['layer']})"

    for task, e in summary.items():
        up = e.get("upper_bound", {}).get("values")
        table.add_row(task, e["metric"], held(e, "values"), held(e, "keys"),
                      "-" if up is None else f"{up['score']:.3f} (L{up['layer']})",
                      _fmt(e["projector"]), _fmt(e["vision"]))
    return table


def delta_table(delta: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("task", "metric", "keys change per layer", "values change per layer"):
        table.add_column(col)
    for task, e in delta.items():
        table.add_row(task, e["metric"], _curve(e["keys"]), _curve(e["values"]))
    return table


def _perceive_config(tasks: str, data, seed: int, n: int, layers: str, batch_size: int,
                     prefix: str | None = None):
    from vislens.experiments.perception.perceive import PerceiveConfig, check_tasks

    positive("--n", n)
    positive("--batch-size", batch_size)
    return PerceiveConfig(tasks=check_tasks([t.strip() for t in tasks.split(",") if t.strip()]),
                          data=_data(data), n=n, layers=_layers(layers), seed=seed,
                          batch_size=batch_size, prefix=prefix)


def _meta(model: str, vlm) -> dict:
    return {"model": model, "num_layers": vlm.num_layers}


def perceive(
    model: str = typer.Option("toy", help=MODEL_HELP),
    data: list[str] = typer.Option(None, help=DATA_HELP),
    tasks: str = typer.Option("fg-seg,co-seg,sem-seg,ref-seg,sem-corr,temp-corr",
                              help=TASKS_HELP),
    n: int = typer.Option(20, "--n", help="items per task (episodes, sets, images, pairs, videos)"),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    out: Path = typer.Option(Path("runs/perceive"), help="run directory (resumable)"),
    seed: int = typer.Option(0, help="seed for clustering and sampling (the data's world is "
                              "set by --data shapesworld:SEED)"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Zero-shot perception from image keys / values in every LM layer (Liu et al. B1).

    Six tasks, each scored for keys and values per layer and for the projector
    output and the vision encoder output: fg-seg (5-shot linear probe, mIoU),
    co-seg (k-means, IoU), sem-seg (class-name text values, mIoU), ref-seg
    (expression text values, mIoU), sem-corr (nearest neighbour, PCK@0.1),
    temp-corr (label propagation, J&F). Scored at image-token level.

    Example: vislens perceive --model toy --out runs/perceive
    """
    with user_errors():
        from vislens.experiments.perception import perceive as exp

        config = _perceive_config(tasks, data, seed, n, layers, batch_size)
        vlm = _load(model, device, dtype)
        _check_layers(vlm, config.layers)
        summary = exp.execute(vlm, config, out, _meta(model, vlm), progress)
        result = summary["tasks"]
        if as_json:
            emit(summary, True)
            return
        Console().print(perception_table(result, f"{model}: perception per source"))
        console.print(f"plots and summary.json in {out}")


def prefix(
    model: str = typer.Option("toy", help=MODEL_HELP),
    text: str = typer.Option("task", "--prefix",
                             help="text before the image: 'task' (the task in words), "
                                  "'classes' (the class names) or any text"),
    data: list[str] = typer.Option(None, help=DATA_HELP),
    tasks: str = typer.Option("fg-seg,co-seg,sem-seg,ref-seg,sem-corr,temp-corr",
                              help=TASKS_HELP),
    n: int = typer.Option(20, "--n", help="items per task"),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    out: Path = typer.Option(Path("runs/prefix"), help="run directory (resumable)"),
    seed: int = typer.Option(0, help="seed for clustering and sampling"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
    dtype: str = typer.Option(None, help="model dtype, e.g. bfloat16"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Re-run perceive with a text prefix before the image; report the change (Liu et al. B3).

    Example: vislens prefix --model toy --prefix classes --out runs/prefix
    """
    with user_errors():
        from vislens.experiments.perception import prefix as exp

        if not text.strip():
            raise VislensError("--prefix is empty; give 'task', 'classes' or some text")
        config = _perceive_config(tasks, data, seed, n, layers, batch_size, prefix=text)
        vlm = _load(model, device, dtype)
        _check_layers(vlm, config.layers)
        summary = exp.execute(vlm, config, out, _meta(model, vlm), progress)
        if as_json:
            emit(summary, True)
            return
        Console().print(perception_table(summary["prefixed"], f"{model}: with prefix {text!r}"))
        Console().print(delta_table(summary["delta"], "change with the prefix (prefix - clean)"))


def artifacts(
    model: str = typer.Option("toy", help=MODEL_HELP),
    data: list[str] = typer.Option(None, help=DATA_HELP),
    n_images: int = typer.Option(32, help="images the artifact scores are computed on"),
    z: float = typer.Option(2.0, help="flag positions scoring above mean + z * std of the layer"),
    min_score: float = typer.Option(0.9, help="... and above this similarity to the mean key"),
    n: int = typer.Option(20, "--n", help="items per re-measured task and multiple-choice items"),
    kind: str = typer.Option("fill", help="ShapesWorld multiple-choice attribute: shape, color, "
                                          "fill"),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    out: Path = typer.Option(Path("runs/artifacts"), help="run directory (resumable)"),
    seed: int = typer.Option(0, help="seed for clustering and sampling"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
    dtype: str = typer.Option(None, help="model dtype, e.g. bfloat16"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Find input-agnostic image keys per layer, block text from reading them, re-measure
    perception (sem-seg, ref-seg) and multiple-choice accuracy (Liu et al. B2).

    Example: vislens artifacts --model toy --out runs/artifacts
    """
    with user_errors():
        from vislens.experiments.perception import artifacts as exp
        from vislens.experiments.perception.surface import SurfaceConfig

        positive("--n-images", n_images)
        specs = _data(data)
        pcfg = _perceive_config("sem-seg,ref-seg", data, seed, n, layers, batch_size)
        config = exp.ArtifactsConfig(
            data=specs.get("images", specs["*"]), n_images=n_images, z=z, min_score=min_score,
            layers=pcfg.layers, perceive=pcfg, batch_size=batch_size,
            mc=SurfaceConfig(data=specs.get("mc", specs["*"]), n=n, kind=kind,
                             batch_size=batch_size))
        vlm = _load(model, device, dtype)
        _check_layers(vlm, config.layers)
        summary = exp.execute(vlm, config, out, _meta(model, vlm), progress)
        p = summary["perceive"]
        if as_json:
            emit(summary, True)
            return
        table = Table(title=f"{model}: input-agnostic keys ({n_images} images)")
        for col in ("layer", "flagged", "max score", "mean score"):
            table.add_column(col, justify="right")
        for layer, count in summary["n_flagged"].items():
            table.add_row(layer, str(count), f"{summary['score_max'][layer]:.3f}",
                          f"{summary['score_mean'][layer]:.3f}")
        Console().print(table)
        Console().print(delta_table(p["delta"], "perception change when text cannot read them"))
        mc = summary["multiple_choice"]
        console.print(f"multiple choice ({mc['kind']}, n={mc['n']}): "
                      f"{mc['clean_accuracy']:.3f} -> {mc['knockout_accuracy']:.3f}")


def surface(
    model: str = typer.Option("toy", help=MODEL_HELP),
    data: str = typer.Option("shapesworld", help="multiple-choice items: shapesworld[:SEED] "
                                                  "or blink:PARQUET"),
    kind: str = typer.Option("fill", help="ShapesWorld attribute asked about: shape, color, "
                                          "fill (the 'style' analogue)"),
    n: int = typer.Option(40, "--n", help="items (even ones choose the layer, odd ones score)"),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    out: Path = typer.Option(Path("runs/surface"), help="run directory (resumable)"),
    sources: str = typer.Option("values,projector,vision",
                                help="readouts to compare: values plus projector and/or vision "
                                     "(drop vision where a family resamples its features)"),
    batch_size: int = typer.Option(8, help="items per forward pass"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Is the answer in the image values but not in the model's output? (Liu et al. B4)

    Compares the model's own choice (the likeliest "(A)"/"(B)" answer; several images
    for OneVision / Qwen2.5-VL, a 2x2 composite otherwise) with a readout from image
    values (the candidate whose mean value is closest to the reference's).

    Example: vislens surface --model toy --n 40 --out runs/surface
    """
    with user_errors():
        from vislens.experiments.perception import surface as exp

        positive("--n", n)
        positive("--batch-size", batch_size)
        if kind not in ("shape", "color", "fill"):
            raise VislensError(f"--kind must be shape, color or fill, got {kind!r}")
        spec = data
        config = exp.SurfaceConfig(data=spec, n=n, kind=kind, layers=_layers(layers),
                                   batch_size=batch_size, sources=_sources(sources))
        vlm = _load(model, device, dtype)
        _check_layers(vlm, config.layers)
        summary = exp.execute(vlm, config, out, _meta(model, vlm), progress)
        if as_json:
            emit(summary, True)
            return
        table = Table(title=f"{model}: model answer vs image-value readout "
                            f"({summary['n_scored']} scored items, layer {summary['best_layer']})")
        for col in ("", "count"):
            table.add_column(col)
        for key in ("solved_by_values_not_model", "solved_by_model_not_values", "both",
                    "neither"):
            table.add_row(key.replace("_", " "), str(summary[key]))
        Console().print(table)
        hidden = summary["present_not_surfaced"]
        console.print(f"values {summary['values_accuracy']['rate']:.3f}, model "
                      f"{summary['model_accuracy']['rate']:.3f}, chance "
                      f"{summary['chance_accuracy']:.3f}; present but not surfaced: "
                      f"{hidden['rate']:.3f} [{hidden['ci95'][0]:.3f}, {hidden['ci95'][1]:.3f}] "
                      "(paper, BLINK Art Style: 0.333)")
