"""`vislens artifacts`: Liu et al. B2, input-agnostic image keys and blocking them."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli.common import console, emit, fmt, positive, progress_for
from vislens.cli.model_options import ModelOptions, model_options, model_session
from vislens.cli.perception_options import (
    DATA_HELP,
    LAYERS_HELP,
    check_layers,
    layer_table,
    meta,
    parse_data,
    perceive_config,
)
from vislens.cli.prefix import headline_table


@model_options
def artifacts(
    opts: ModelOptions,
    data: list[str] = typer.Option(None, help=DATA_HELP),
    n_images: int = typer.Option(32, help="images the artifact scores are computed on"),
    z: float = typer.Option(2.0, help="flag positions scoring above mean + z * std of the layer"),
    min_score: float = typer.Option(0.9, help="... and above this input-agnostic score "
                                              "(1 = the key ignores its input)"),
    n: int = typer.Option(20, "--n", help="items per re-measured task and multiple-choice items"),
    kind: str = typer.Option("fill", help="ShapesWorld multiple-choice attribute: shape, color, "
                                          "fill"),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    out: Path = typer.Option(Path("runs/artifacts"), help="run directory (resumable)"),
    seed: int = typer.Option(0, help="seed for clustering, the selection split and the "
                                     "bootstrap intervals"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
) -> None:
    """Find input-agnostic image keys per layer, block text from reading them, re-measure
    perception (sem-seg, ref-seg) and multiple-choice accuracy (Liu et al. B2).

    Example: vislens artifacts --model toy --out runs/artifacts
    """
    with model_session(opts) as load:
        from vislens.experiments.perception import artifacts as exp
        from vislens.experiments.perception.surface import SurfaceConfig

        positive("--n-images", n_images)
        specs = parse_data(data)
        pcfg = perceive_config("sem-seg,ref-seg", data, seed, n, layers, batch_size)
        config = exp.ArtifactsConfig(
            data=specs.get("images", specs["*"]), n_images=n_images, z=z, min_score=min_score,
            layers=pcfg.layers, perceive=pcfg, batch_size=batch_size,
            mc=SurfaceConfig(data=specs.get("mc", specs["*"]), n=n, kind=kind,
                             batch_size=batch_size))
        vlm = load()
        check_layers(vlm, config.layers)
        summary = exp.execute(vlm, config, out, meta(opts.model, vlm), progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        table = Table(title=f"{opts.model}: input-agnostic keys ({n_images} images)")
        for col in ("layer", "flagged", "max score", "mean score"):
            table.add_column(col, justify="right")
        for layer, count in summary["n_flagged"].items():
            table.add_row(layer, str(count), f"{summary['score_max'][layer]:.3f}",
                          f"{summary['score_mean'][layer]:.3f}")
        Console().print(table)
        Console().print(layer_table(summary["perceive"]["delta"],
                                      "perception change when text cannot read them (all "
                                      "items)", signed=True))
        if summary["perceive"]["headline"]:
            Console().print(headline_table(summary["perceive"]["headline"],
                                           "change with the artifacts blocked"))
        else:
            console.print("no key position flagged: nothing blocked, nothing changes")
        mc = summary["multiple_choice"]
        ci = mc["delta_ci95"]
        console.print(f"multiple choice ({mc['kind']}, n={mc['n']}, chance "
                      f"{fmt(mc['chance_accuracy'])}): {fmt(mc['clean_accuracy'])} -> "
                      f"{fmt(mc['knockout_accuracy'])}, change {fmt(mc['delta'])}"
                      + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
