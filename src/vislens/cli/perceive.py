"""`vislens perceive`: Liu et al. B1, zero-shot perception from image keys / values."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from vislens.cli.common import console, emit, progress_for
from vislens.cli.model_options import ModelOptions, model_options, model_session
from vislens.cli.perception_options import (
    ALL_TASKS,
    DATA_HELP,
    LAYERS_HELP,
    TASKS_HELP,
    check_layers,
    layer_table,
    meta,
    perceive_config,
    perception_table,
)


@model_options
def perceive(
    opts: ModelOptions,
    data: list[str] = typer.Option(None, help=DATA_HELP),
    tasks: str = typer.Option(ALL_TASKS, help=TASKS_HELP),
    n: int = typer.Option(20, "--n", help="items per task (episodes, sets, images, pairs, videos)"),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    out: Path = typer.Option(Path("runs/perceive"), help="run directory (resumable)"),
    seed: int = typer.Option(0, help="seed for clustering and sampling (the data's world is "
                              "set by --data shapesworld:SEED)"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
    sem_seg_oracle: bool = typer.Option(True, help="also report sem-seg-oracle: the choice "
                                        "among the classes present only (told the answer); "
                                        "sem-seg itself always chooses among all the data "
                                        "set's classes"),
    text_token: str = typer.Option("mean", help="sem-seg / ref-seg text feature: the span's "
                                   "'mean' token feature or its 'last' token's"),
    similarity: str = typer.Option("cosine", help="text vs image tokens (sem-seg, ref-seg): "
                                   "'cosine' or 'dot' (the plain dot product)"),
) -> None:
    """Zero-shot perception from image keys / values in every LM layer (Liu et al. B1).

    Six tasks, each scored for keys and values per layer and for the projector
    output and the vision encoder output: fg-seg (5-shot linear probe, mIoU),
    co-seg (k-means, IoU), sem-seg (class-name text values, mIoU), ref-seg
    (expression text values, mIoU), sem-corr (nearest neighbour, PCK@0.1),
    temp-corr (label propagation, J&F). Scored at pixel level (token predictions
    painted onto their pixels; uncovered pixels = background), token level beside it.
    One split per task, by item and stratified by class: the layer is chosen on the
    selection half and every source is reported on the held-out half, with chance
    levels and item counts.

    Example: vislens perceive --model toy --out runs/perceive
    """
    with model_session(opts) as load:
        from vislens.experiments.perception import perceive as exp

        config = perceive_config(tasks, data, seed, n, layers, batch_size,
                                   sem_seg_oracle=sem_seg_oracle, text_token=text_token,
                                   similarity=similarity)
        vlm = load()
        check_layers(vlm, config.layers)
        summary = exp.execute(vlm, config, out, meta(opts.model, vlm), progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        Console().print(perception_table(summary["tasks"],
                                           f"{opts.model}: perception per source"))
        Console().print(layer_table(summary["tasks"], "score per LM layer"))
        console.print(f"plots and summary.json in {out}")
