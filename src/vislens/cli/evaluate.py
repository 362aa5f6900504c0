"""`vislens eval`: how often a model answers fresh ShapesWorld questions right."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli.common import emit, positive, progress_for
from vislens.cli.model_options import ModelOptions, model_options, model_session


@model_options(workers=False)
def evaluate(
    opts: ModelOptions,
    n: int = typer.Option(50, "--n", help="number of fresh ShapesWorld scenes"),
    seed: int = typer.Option(1000, help="ShapesWorld seed (held out; the toys trained on 0)"),
    batch_size: int = typer.Option(32, help="questions per forward pass"),
) -> None:
    """Measure a model's accuracy on fresh ShapesWorld scenes in each setting.

    Check a model before you interpret it: generative (the target's name appears in
    the description), polling (yes / no, balanced), VQA (one word after a fixed prefix).

    Example: vislens eval --model toy --n 100 --seed 7 --json
    """
    with model_session(opts) as load:
        positive("--n", n)
        positive("--batch-size", batch_size)
        from vislens.data import shapesworld
        from vislens.experiments.accuracy import evaluate as run

        shapesworld.check_held_out(seed)
        vlm = load()
        samples = shapesworld.generate(n, seed=seed)
        result = run(vlm.model, vlm.processor, samples, batch_size=batch_size,
                     progress=progress_for(opts.as_json))
        summary = {"model": opts.model, "seed": seed, **result}
        if opts.as_json:
            emit(summary, True)
            return
        table = Table(title=f"{opts.model}: accuracy on {n} ShapesWorld scenes (seed {seed})")
        table.add_column("setting")
        table.add_column("questions", justify="right")
        table.add_column("accuracy", justify="right")
        table.add_column("95% CI", justify="right")
        for setting, acc in result["accuracy"].items():
            lo, hi = result["ci95"][setting]
            table.add_row(setting, str(result["questions"][setting]), f"{acc:.3f}",
                          f"{lo:.3f}-{hi:.3f}")
        Console().print(table)
