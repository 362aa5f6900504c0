"""`vislens knockout`: Neo et al. A3, how the answer reads the image."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli.common import emit, fmt, progress_for
from vislens.cli.image_inputs import (
    DATA_HELP,
    DEFAULT_DATA,
    meta,
    names,
    open_samples,
    print_funnel,
)
from vislens.cli.model_options import ModelOptions, model_options, model_session


@model_options
def knockout(
    opts: ModelOptions,
    data: str = typer.Option(DEFAULT_DATA, help=DATA_HELP),
    n: int = typer.Option(100, "--n", help="number of images"),
    out: Path = typer.Option(Path("runs/knockout"), help="run directory (rerun to resume)"),
    settings: str = typer.Option("polling,vqa", help="comma-separated settings"),
    conditions: str = typer.Option("", help="comma-separated edge sets, e.g. object+1->last,"
                                   "image->question (default: every one the model's family "
                                   "can run; an unknown name lists them)"),
    windows: str = typer.Option("neo", help="layer windows, a comma list: neo (Neo et al.'s "
                                "0-9,5-14,11-20,15-24,21-31 on 32 layers, scaled by depth, "
                                "and all), FIRST-LAST, all, sliding:K (a K-layer window "
                                "centred on each layer); e.g. 0-9,11-20,all"),
    window: int = typer.Option(None, help="instead of --windows: evenly strided windows of "
                               "this many layers (and all)"),
    stride: int = typer.Option(None, help="their stride (default: half the window)"),
    area: str = typer.Option("", help="target area range MIN:MAX in pixels"),
    seed: int = typer.Option(0, help="seed for choosing targets"),
) -> None:
    """Block attention edges in windows of layers; measure how much of the answer survives.

    Edge sets (Neo et al.'s six, as their released code builds them): object (+1, +2
    buffer) -> answer position, the image but object+1 -> answer, object+1 -> last image
    row, every image token above the last row -> last row; and image -> the question's
    words. Two correctness rules: every answer token kept, and Neo's first token. All
    conditions x windows of a sample run as one batch, resuming from cached clean states.

    Example: vislens knockout --model toy --n 100 --windows sliding:1,all --out runs/ko --json
    """
    with model_session(opts) as load:
        from vislens.experiments import knockout as ko

        config = ko.KnockoutConfig(settings=names(settings),
                                   conditions=names(conditions) or ko.CONDITIONS,
                                   windows=windows, window=window, stride=stride, seed=seed)
        if (window is not None or stride is not None) and windows != "neo":
            raise ValueError("give --windows or --window/--stride, not both")
        config.validate()
        samples, config.area = open_samples(data, n, area or None, "small")
        vlm = load()
        summary = ko.execute(vlm, samples, config, out, meta(opts, data, n),
                             progress=progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        kept = ", ".join(f"{s} {k}" for s, k in summary["n_kept"].items())
        for key, what in (("relative_accuracy", "every answer token"),
                          ("relative_accuracy_first_token", "first token, as Neo et al.")):
            table = Table(title=f"relative accuracy after knockout, {what} ({opts.model}; "
                          f"kept: {kept})")
            table.add_column("edges blocked \\ layers")
            for label in summary["window_labels"]:
                table.add_column(label, justify="right")
            for c, values in summary[key].items():
                table.add_row(c, *[fmt(v, 2) for v in values])
            Console().print(table)
        print_funnel(summary)
