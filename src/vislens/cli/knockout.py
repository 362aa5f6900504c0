"""`vislens knockout`: Neo et al. A3, how the answer reads the image."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli import samples as S
from vislens.cli.common import (
    DEVICE_MAP_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    JSON_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_OPTION,
    RAY_OPTION,
    WORKERS_OPTION,
    emit,
    fmt,
    placement,
    progress_for,
    quiet,
    scale_out,
    user_errors,
)


def knockout(
    model: str = MODEL_OPTION,
    data: str = typer.Option(S.DEFAULT_DATA, help=S.DATA_HELP),
    n: int = typer.Option(100, "--n", help="number of images"),
    out: Path = typer.Option(Path("runs/knockout"), help="run directory (rerun to resume)"),
    settings: str = typer.Option("polling,vqa", help="comma-separated settings"),
    conditions: str = typer.Option("", help="comma-separated edge sets, e.g. object+1->last,"
                                   "image->question (default: every one the model's family "
                                   "can run; an unknown name lists them)"),
    window: int = typer.Option(None, help="layers per window (default: 10/32 of the depth)"),
    stride: int = typer.Option(None, help="window stride (default: 5/32 of the depth)"),
    area: str = typer.Option("", help="target area range MIN:MAX in pixels"),
    seed: int = typer.Option(0, help="seed for choosing targets"),
    device: str = DEVICE_OPTION,
    device_map: str = DEVICE_MAP_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    dtype: str = DTYPE_OPTION,
    workers: int = WORKERS_OPTION,
    ray: str = RAY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Block attention edges in windows of layers; measure how much of the answer survives.

    Edge sets: object (+1, +2 buffer) -> answer position, the rest of the image -> answer,
    object+1 / everything else -> last image row, image -> question tokens. All
    conditions x windows of a sample run as one batch, resuming from cached clean states.

    Example: vislens knockout --model toy --n 100 --window 1 --out runs/knockout --json
    """
    with user_errors(), quiet(as_json), scale_out(workers, ray) as models:
        from vislens.experiments import knockout as ko

        config = ko.KnockoutConfig(settings=S.names(settings),
                                   conditions=S.names(conditions) or ko.CONDITIONS,
                                   window=window, stride=stride, seed=seed)
        config.validate()
        samples, config.area = S.open_samples(data, n, area or None, "small")
        vlm = models.load(model, device, dtype, local=S.load_model,
                          **placement(device, device_map, max_memory))
        summary = ko.execute(vlm, samples, config, out, S.meta(model, data, n, device, dtype),
                             progress=progress_for(as_json))
        if as_json:
            emit(summary, True)
            return
        kept = ", ".join(f"{s} {k}" for s, k in summary["n_kept"].items())
        table = Table(title=f"relative accuracy after knockout ({model}; kept: {kept})")
        table.add_column("edges blocked \\ layers")
        for label in summary["window_labels"]:
            table.add_column(label, justify="right")
        for c, values in summary["relative_accuracy"].items():
            table.add_row(c, *[fmt(v, 2) for v in values])
        Console().print(table)
        S.print_funnel(summary)
