"""`vislens surface`: Liu et al. B4, present in the values but not surfaced."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli.common import console, emit, positive, progress_for
from vislens.cli.model_options import ModelOptions, model_options, model_session
from vislens.cli.perception_options import (
    LAYERS_HELP,
    check_layers,
    meta,
    parse_layers,
    parse_sources,
)
from vislens.errors import VislensError


@model_options
def surface(
    opts: ModelOptions,
    data: str = typer.Option("shapesworld", help="multiple-choice items: shapesworld[:SEED] "
                                                  "(held-out world 1000 by default) or "
                                                  "blink:PARQUET"),
    kind: str = typer.Option("fill", help="ShapesWorld attribute asked about: shape, color, "
                                          "fill (the 'style' analogue)"),
    n: int = typer.Option(40, "--n", help="items (even ones choose the layer, odd ones score)"),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    out: Path = typer.Option(Path("runs/surface"), help="run directory (resumable)"),
    sources: str = typer.Option("values,projector,vision",
                                help="readouts to compare: values plus projector and/or vision "
                                     "(drop vision where a family resamples its features)"),
    seed: int = typer.Option(0, help="seed of the permutation baseline (candidates shuffled)"),
    batch_size: int = typer.Option(8, help="items per forward pass"),
) -> None:
    """Is the answer in the image values but not in the model's output? (Liu et al. B4)

    Compares the model's own choice (the likeliest "(A)"/"(B)" answer; several images
    for OneVision / Qwen2.5-VL, a 2x2 composite otherwise) with a readout from image
    values (the candidate whose mean value is closest to the reference's).

    Example: vislens surface --model toy --n 40 --out runs/surface
    """
    with model_session(opts) as load:
        from vislens.experiments.perception import surface as exp

        positive("--n", n)
        positive("--batch-size", batch_size)
        if kind not in ("shape", "color", "fill"):
            raise VislensError(f"--kind must be shape, color or fill, got {kind!r}")
        config = exp.SurfaceConfig(data=data, n=n, kind=kind, layers=parse_layers(layers),
                                   batch_size=batch_size, sources=parse_sources(sources),
                                   seed=seed)
        config.validate()
        vlm = load()
        check_layers(vlm, config.layers)
        summary = exp.execute(vlm, config, out, meta(opts.model, vlm), progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        table = Table(title=f"{opts.model}: model answer vs image-value readout "
                            f"({summary['n_scored']} scored items, layer {summary['best_layer']})")
        for col in ("", "count"):
            table.add_column(col)
        for key in ("solved_by_values_not_model", "solved_by_model_not_values", "both",
                    "neither"):
            table.add_row(key.replace("_", " "), str(summary[key]))
        Console().print(table)
        hidden, perm = summary["present_not_surfaced"], summary["values_permutation"]
        n_scored, chance = summary["n_scored"], summary["present_not_surfaced_chance"]
        console.print(f"values {summary['values_accuracy']['rate']:.3f}, model "
                      f"{summary['model_accuracy']['rate']:.3f}, chance "
                      f"{summary['chance_accuracy']:.3f} (n={n_scored}); permuted values "
                      f"{perm['mean']:.3f} [{perm['ci95'][0]:.3f}, {perm['ci95'][1]:.3f}], "
                      f"p={perm['p_value']:.3f}")
        console.print(f"present but not surfaced: {hidden['rate']:.3f} "
                      f"[{hidden['ci95'][0]:.3f}, {hidden['ci95'][1]:.3f}] (n={n_scored}; "
                      f"chance {chance:.3f}; paper, BLINK Art Style: 0.333)")
        if summary["values_beat_chance"]:
            console.print("the values readout beats chance (permutation p < "
                          f"{config.alpha}): the headline counts real information")
        else:
            console.print("the values readout does NOT beat chance (permutation p = "
                          f"{perm['p_value']:.3f}): the headline is noise")
