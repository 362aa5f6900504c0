"""`vislens world`: ShapesWorld scenes written as a COCO data set."""

from __future__ import annotations

from pathlib import Path

import typer

from vislens.cli.common import JSON_OPTION, console, emit, positive, user_errors


def world(
    out: Path = typer.Option(..., help="directory to write (COCO layout)"),
    n: int = typer.Option(100, "--n", help="number of scenes"),
    seed: int = typer.Option(1000, help="ShapesWorld seed"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write ShapesWorld scenes as a COCO instances data set plus questions.jsonl.

    Example: vislens world --out data/shapes --n 200 --seed 3
    """
    with user_errors():
        positive("--n", n)
        from vislens.data.world import write_world

        summary = write_world(out, n=n, seed=seed)  # the toys' training world is refused
        if as_json:
            emit(summary, True)
        else:
            console.print(f"wrote {n} scenes to {out}")
