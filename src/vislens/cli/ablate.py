"""`vislens ablate`: Neo et al. A1, which image tokens carry an object."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli.common import console, emit, progress_for
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
def ablate(
    opts: ModelOptions,
    data: str = typer.Option(DEFAULT_DATA, help=DATA_HELP),
    n: int = typer.Option(200, "--n", help="number of images to draw (ShapesWorld) or read"),
    out: Path = typer.Option(Path("runs/ablate"), help="run directory (rerun to resume)"),
    settings: str = typer.Option("generative,polling,vqa", help="comma-separated settings"),
    conditions: str = typer.Option("", help="comma-separated conditions (default: all)"),
    vector: str = typer.Option("mean", help="ablation vector: mean (post-projector) or zeros"),
    reference: str = typer.Option("", help="images for the mean vector, e.g. imagenet:DIR "
                                  "(Neo et al.: ImageNet val). Default: never the evaluated "
                                  "images; for shapesworld:SEED scenes of the next held-out "
                                  "world (summary: reference), other data must name one"),
    area: str = typer.Option("", help="target area range MIN:MAX in pixels "
                             "(default: small objects; COCO 1000:2000)"),
    ig_steps: int = typer.Option(50, help="integrated-gradients steps (Neo et al.: 50)"),
    ig_batch: int = typer.Option(0, help="IG steps per forward + backward pass; 0: as many as "
                                 "half the free GPU memory holds (8 on the CPU)"),
    ig_sign: str = typer.Option("abs", help="rank ig-matched tokens by abs: |IG| summed over "
                                "hidden dims (Neo et al.), or signed: the plain sum"),
    ig_prompt: str = typer.Option("polling", help="IG on the polling question, once per image "
                                  "for every setting (Neo et al.), or own: each setting's "
                                  "prompt and answer word (a variant)"),
    seed: int = typer.Option(0, help="seed for targets, random token sets and noise"),
) -> None:
    """Ablate object / buffer / register / random / gradient tokens and count broken answers.

    Keeps samples the model gets right that fail when the object's pixels are noised,
    then replaces the LM input embeddings of each token set with the mean image
    embedding (or zeros): the % of kept samples that become wrong, per setting. All
    conditions of a sample run as one batch over one vision pass.

    Example: vislens ablate --model toy --n 200 --out runs/ablate --json
    """
    with model_session(opts) as load:
        from vislens.experiments import ablation

        config = ablation.AblationConfig(settings=names(settings),
                                         conditions=names(conditions) or None,
                                         vector=vector, ig_steps=ig_steps, ig_batch=ig_batch,
                                         ig_sign=ig_sign,
                                         ig_prompt=ig_prompt, reference=reference, seed=seed)
        config.validate()
        samples, config.area = open_samples(data, n, area or None, "small")
        vlm = load()
        # --reference (imagenet:DIR is read lazily) or the default held-out set: run() resolves
        # it and the summary's "reference" records which set, how many images, and overlap
        summary = ablation.execute(vlm, samples, config, out,
                                   meta(opts, data, n, reference=reference),
                                   progress=progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        table = Table(title=f"% of correct answers broken ({opts.model}, {data})")
        table.add_column("condition")
        for s in config.settings:
            table.add_column(f"{s} (n={summary['n_kept'][s]})", justify="right")
        rows = list(dict.fromkeys(c for s in config.settings for c in summary["drop"][s]))
        for c in rows:
            table.add_row(c, *[_pct(summary["drop"][s].get(c)) for s in config.settings])
        Console().print(table)
        ref = summary.get("reference")
        if ref:
            console.print(f"mean vector over {ref['n_images']} images of {ref['spec']} "
                          f"({'disjoint from' if ref['disjoint'] else 'OVERLAPPING'} the "
                          f"evaluated images{'; vislens default' if ref['default'] else ''})")
        print_funnel(summary)
        console.print(f"rows, summary and plot in {out}")


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0f}%"
