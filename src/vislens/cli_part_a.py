"""`vislens ablate | logit-lens | knockout`: Neo et al. 2024 as commands."""

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
    parse_area,
    positive,
    progress,
    user_errors,
)

DATA_HELP = 'data set: "shapesworld[:SEED]" (embedded, SEED 1000+ is held out from the toys\' ' \
    'training) or "coco:DIR" (COCO instances json + images)'
DEFAULT_DATA = "shapesworld:1000"
# target areas in original pixels: small objects for ablation / knockout (few object
# tokens), one large object for the logit lens; the COCO ranges are the paper's
AREAS = {
    "small": {"shapesworld": (0.0, 350.0), "coco": (1000.0, 2000.0)},
    "large": {"shapesworld": (350.0, float("inf")), "coco": (20000.0, 30000.0)},
}


def _setup(model: str, data: str, n: int, device: str, dtype: str | None,
           area: str | None, which: str):
    positive("--n", n)
    from vislens.data import coco, open_dataset
    from vislens.models import load

    kind = data.partition(":")[0].lower()
    chosen = parse_area(area) if area else AREAS[which].get(kind)
    select = None
    if kind == "coco":  # Neo et al.'s image selection, before any pixel is read
        select = coco.small_target(area=chosen) if which == "small" else \
            coco.large_object(area=chosen)
    samples = open_dataset(data, n=n, select=select)
    if not samples:
        raise ValueError(f"{data} holds no images; check the path or --n")
    vlm = load(model, device=device, dtype=dtype)
    return vlm, samples, chosen


def _meta(model: str, data: str, n: int, device: str, dtype: str | None, **extra) -> dict:
    """What a run directory records besides the experiment's own config."""
    return {"model": model, "data": data, "n": n, "device": device, "dtype": dtype, **extra}


def ablate(
    model: str = typer.Option("toy", help=MODEL_HELP),
    data: str = typer.Option(DEFAULT_DATA, help=DATA_HELP),
    n: int = typer.Option(200, "--n", help="number of images to draw (ShapesWorld) or read"),
    out: Path = typer.Option(Path("runs/ablate"), help="run directory (rerun to resume)"),
    settings: str = typer.Option("generative,polling,vqa", help="comma-separated settings"),
    conditions: str = typer.Option("", help="comma-separated conditions (default: all)"),
    vector: str = typer.Option("mean", help="ablation vector: mean (post-projector) or zeros"),
    reference: str = typer.Option("", help="images for the mean vector, e.g. imagenet:DIR "
                                  "(default: the experiment's own images)"),
    area: str = typer.Option("", help="target area range MIN:MAX in pixels "
                             "(default: small objects; COCO 1000:2000)"),
    ig_steps: int = typer.Option(16, help="integrated-gradients steps"),
    seed: int = typer.Option(0, help="seed for targets, random token sets and noise"),
    device: str = typer.Option("cpu", help="torch device"),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Ablate object / buffer / register / random / gradient tokens and count broken answers.

    Keeps samples the model gets right that fail when the object's pixels are noised,
    then replaces the LM input embeddings of each token set with the mean image
    embedding (or zeros): the % of kept samples that become wrong, per setting. All
    conditions of a sample run as one batch over one vision pass.

    Example: vislens ablate --model toy --n 200 --out runs/ablate --json
    """
    with user_errors():
        from vislens.experiments import ablation

        vlm, samples, chosen = _setup(model, data, n, device, dtype, area or None, "small")
        config = ablation.AblationConfig(
            settings=tuple(s.strip() for s in settings.split(",") if s.strip()),
            conditions=tuple(c.strip() for c in conditions.split(",") if c.strip()) or None,
            vector=vector, area=chosen, ig_steps=ig_steps, seed=seed)
        ref_images = None
        if reference:
            from vislens.data import open_dataset

            ref_images = [s.image for s in open_dataset(reference)]
        meta = _meta(model, data, n, device, dtype, reference=reference)
        summary = ablation.execute(vlm, samples, config, out, meta, reference_images=ref_images,
                                   progress=progress)
        if as_json:
            emit(summary, True)
            return
        table = Table(title=f"% of initially-correct samples broken ({model}, {data})")
        table.add_column("condition")
        for s in config.settings:
            table.add_column(f"{s} (n={summary['n_kept'][s]})", justify="right")
        names = list(dict.fromkeys(c for s in config.settings for c in summary["drop"][s]))
        for c in names:
            table.add_row(c, *[_fmt(summary["drop"][s].get(c)) for s in config.settings])
        Console().print(table)
        console.print(f"rows, summary and plot in {out}")


def logit_lens(
    model: str = typer.Option("toy", help=MODEL_HELP),
    data: str = typer.Option(DEFAULT_DATA, help=DATA_HELP),
    n: int = typer.Option(60, "--n", help="number of images"),
    out: Path = typer.Option(Path("runs/logit-lens"), help="run directory (rerun to resume)"),
    top_k: int = typer.Option(5, help="tokens kept per layer and image token"),
    area: str = typer.Option("", help="target area range MIN:MAX in pixels "
                             "(default: one large object; COCO 20000:30000)"),
    viewers: int = typer.Option(3, help="interactive HTML viewers for the first N images"),
    seed: int = typer.Option(0, help="seed for choosing targets"),
    batch_size: int = typer.Option(4, help="images per forward pass"),
    device: str = typer.Option("cpu", help="torch device"),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Decode every image token at every layer (final norm + unembedding, applied once).

    Reports how many object patches decode to the object's word at some layer, at
    which layer, per-layer curves and background false alarms; writes an
    interactive viewer per image.

    Example: vislens logit-lens --model toy --n 60 --out runs/lens --viewers 3
    """
    with user_errors():
        positive("--top-k", top_k)
        from vislens.experiments import logit_lens as lens

        positive("--batch-size", batch_size)
        vlm, samples, chosen = _setup(model, data, n, device, dtype, area or None, "large")
        config = lens.LensConfig(top_k=top_k, area=chosen, viewers=viewers, seed=seed,
                                 batch_size=batch_size)
        summary = lens.execute(vlm, samples, config, out,
                               _meta(model, data, n, device, dtype),
                               progress=progress)
        if as_json:
            emit(summary, True)
            return
        console.print(
            f"object patches decoding to their word at some layer: {summary['hit_rate']:.1%} "
            f"(background: {summary['background_rate']:.1%}); mean best layer "
            f"{_fmt(summary['peak_layer_mean'])} of {summary['n_layers']}")
        for page in summary["viewer"]:
            console.print(f"viewer: {page}")


def knockout(
    model: str = typer.Option("toy", help=MODEL_HELP),
    data: str = typer.Option(DEFAULT_DATA, help=DATA_HELP),
    n: int = typer.Option(100, "--n", help="number of images"),
    out: Path = typer.Option(Path("runs/knockout"), help="run directory (rerun to resume)"),
    settings: str = typer.Option("polling,vqa", help="comma-separated settings"),
    window: int = typer.Option(None, help="layers per window (default: 10/32 of the depth)"),
    stride: int = typer.Option(None, help="window stride (default: 5/32 of the depth)"),
    area: str = typer.Option("", help="target area range MIN:MAX in pixels"),
    seed: int = typer.Option(0, help="seed for choosing targets"),
    device: str = typer.Option("cpu", help="torch device"),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Block attention edges in windows of layers; measure how much of the answer survives.

    Edge sets: object (+1, +2 buffer) -> answer position, the rest of the image -> answer,
    object+1 / everything else -> last image row, image -> question tokens. All
    conditions x windows of a sample run as one batch, resuming from cached clean states.

    Example: vislens knockout --model toy --n 100 --window 1 --out runs/knockout --json
    """
    with user_errors():
        from vislens.experiments import knockout as ko

        vlm, samples, chosen = _setup(model, data, n, device, dtype, area or None, "small")
        config = ko.KnockoutConfig(
            settings=tuple(s.strip() for s in settings.split(",") if s.strip()),
            window=window, stride=stride, area=chosen, seed=seed)
        summary = ko.execute(vlm, samples, config, out,
                             _meta(model, data, n, device, dtype), progress=progress)
        rel = summary["relative_accuracy"]
        if as_json:
            emit(summary, True)
            return
        table = Table(title=f"relative accuracy after knockout ({model}, n_kept="
                            f"{summary['n_kept']})")
        table.add_column("edges blocked")
        for label in summary["window_labels"]:
            table.add_column(label, justify="right")
        for c, values in rel.items():
            table.add_row(c, *[_fmt(v) for v in values])
        Console().print(table)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"
