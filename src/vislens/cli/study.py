"""`vislens study`: every experiment with defaults, one self-contained report."""

from __future__ import annotations

from pathlib import Path

import typer

from vislens.cli.common import console, emit, progress_for, quiet, user_errors
from vislens.cli.model_options import ModelOptions, model_options, placement
from vislens.errors import VislensError


@model_options
def study(
    out: Path = typer.Option(Path("runs/study"), help="study directory (rerun to resume)"),
    # frozen, so one shared default is safe; Python wants one after --out's
    opts: ModelOptions = ModelOptions(),  # noqa: B008
    data: str = typer.Option("shapesworld:1000", help='"shapesworld[:SEED]" (held out)'),
    scale: float = typer.Option(1.0, help="multiply every step's number of images"),
    seed: int = typer.Option(0, help="seed for targets and random token sets"),
) -> None:
    """Run every experiment with sensible defaults and write one self-contained report.

    Example: vislens study --out runs/demo   (then open runs/demo/report.html)
    """
    # no model_session: the study opens the model once per experiment, itself
    with user_errors(), quiet(opts.as_json):
        if scale <= 0:
            raise VislensError(f"--scale must be positive (got {scale})")
        from vislens.experiments.study import StudyConfig, run_study
        from vislens.report.study import write_study_report
        from vislens.runs.ray_cluster import check

        check(opts.workers, opts.ray or None)
        placement(opts.device, opts.device_map, opts.max_memory)  # checked before any work
        config = StudyConfig(model=opts.model, data=data, scale=scale, seed=seed,
                             device=opts.device, device_map=opts.device_map,
                             max_memory=opts.max_memory, dtype=opts.dtype,
                             workers=opts.workers, ray=opts.ray or None)
        log = (lambda m: None) if opts.as_json else \
            (lambda m: console.print(m, highlight=False))
        ran = run_study(config, out, progress=progress_for(opts.as_json), log=log)
        result = write_study_report(ran, out)
        if opts.as_json:
            emit(result, True)
            return
        console.print(f"study took {result['seconds']['total']:.0f} s; report: "
                      f"{result['report']}")
