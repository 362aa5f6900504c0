"""`vislens eval`: how often a model answers fresh ShapesWorld questions right."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli.common import (
    DEVICE_MAP_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    JSON_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_OPTION,
    emit,
    placement,
    positive,
    progress_for,
    quiet,
    user_errors,
)


def evaluate(
    model: str = MODEL_OPTION,
    n: int = typer.Option(50, "--n", help="number of fresh ShapesWorld scenes"),
    seed: int = typer.Option(1000, help="ShapesWorld seed (held out; the toys trained on 0)"),
    batch_size: int = typer.Option(32, help="questions per forward pass"),
    device: str = DEVICE_OPTION,
    device_map: str = DEVICE_MAP_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Measure a model's accuracy on fresh ShapesWorld scenes in each setting.

    Check a model before you interpret it: generative (the target's name appears in
    the description), polling (yes / no, balanced), VQA (one word after a fixed prefix).

    Example: vislens eval --model toy --n 100 --seed 7 --json
    """
    with user_errors(), quiet(as_json):
        positive("--n", n)
        positive("--batch-size", batch_size)
        from vislens.data import shapesworld
        from vislens.experiments.accuracy import evaluate as run
        from vislens.models import load

        shapesworld.check_held_out(seed)
        vlm = load(model, device=device, dtype=dtype,
                   **placement(device, device_map, max_memory))
        samples = shapesworld.generate(n, seed=seed)
        result = run(vlm.model, vlm.processor, samples, batch_size=batch_size,
                     progress=progress_for(as_json))
        summary = {"model": model, "seed": seed, **result}
        if as_json:
            emit(summary, True)
            return
        table = Table(title=f"{model}: accuracy on {n} ShapesWorld scenes (seed {seed})")
        table.add_column("setting")
        table.add_column("questions", justify="right")
        table.add_column("accuracy", justify="right")
        table.add_column("95% CI", justify="right")
        for setting, acc in result["accuracy"].items():
            lo, hi = result["ci95"][setting]
            table.add_row(setting, str(result["questions"][setting]), f"{acc:.3f}",
                          f"{lo:.3f}-{hi:.3f}")
        Console().print(table)
