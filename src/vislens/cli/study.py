"""`vislens study`: every experiment with defaults, one self-contained report."""

from __future__ import annotations

from pathlib import Path

import typer

from vislens.cli.common import (
    DEVICE_MAP_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    JSON_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_OPTION,
    RAY_OPTION,
    WORKERS_OPTION,
    console,
    emit,
    placement,
    progress_for,
    quiet,
    user_errors,
)
from vislens.errors import VislensError


def study(
    out: Path = typer.Option(Path("runs/study"), help="study directory (rerun to resume)"),
    model: str = MODEL_OPTION,
    data: str = typer.Option("shapesworld:1000", help='"shapesworld[:SEED]" (held out)'),
    scale: float = typer.Option(1.0, help="multiply every step's number of images"),
    seed: int = typer.Option(0, help="seed for targets and random token sets"),
    device: str = DEVICE_OPTION,
    device_map: str = DEVICE_MAP_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    dtype: str = DTYPE_OPTION,
    workers: int = WORKERS_OPTION,
    ray: str = RAY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Run every experiment with sensible defaults and write one self-contained report.

    Example: vislens study --out runs/demo   (then open runs/demo/report.html)
    """
    with user_errors(), quiet(as_json):
        if scale <= 0:
            raise VislensError(f"--scale must be positive (got {scale})")
        from vislens.distributed import check
        from vislens.experiments.study import StudyConfig, run_study

        check(workers, ray or None)
        placement(device, device_map, max_memory)  # checked now; study loads it later
        config = StudyConfig(model=model, data=data, scale=scale, seed=seed, device=device,
                             device_map=device_map, max_memory=max_memory, dtype=dtype,
                             workers=workers, ray=ray or None)
        log = (lambda m: None) if as_json else (lambda m: console.print(m, highlight=False))
        result = run_study(config, out, progress=progress_for(as_json), log=log)
        if as_json:
            emit(result, True)
            return
        console.print(f"study took {result['seconds']['total']:.0f} s; report: "
                      f"{result['report']}")
