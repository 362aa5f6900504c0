"""`vislens attention`: which image patches the answer attends to, per layer and head."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli.common import console, emit, fmt, positive, progress_for
from vislens.cli.image_inputs import DATA_HELP, DEFAULT_DATA, meta, open_samples, print_funnel
from vislens.cli.model_options import ModelOptions, model_options, model_session


@model_options
def attention(
    opts: ModelOptions,
    data: str = typer.Option(DEFAULT_DATA, help=DATA_HELP),
    n: int = typer.Option(60, "--n", help="number of images"),
    out: Path = typer.Option(Path("runs/attention"), help="run directory (rerun to resume)"),
    setting: str = typer.Option("polling", help="the question asked about the target: polling, "
                                "vqa or generative"),
    query: str = typer.Option("last", help="the query token: last (the answer position), -N, "
                              "N, or a word of the prompt"),
    area: str = typer.Option("", help="target area range MIN:MAX in pixels "
                             "(default: one large object; COCO 20000:30000)"),
    viewers: int = typer.Option(3, help="interactive HTML viewers for the first N images"),
    seed: int = typer.Option(0, help="seed for choosing targets"),
    batch_size: int = typer.Option(4, help="images per forward pass"),
) -> None:
    """Where the answer position looks: its attention over image patches in every layer.

    Records the query's attention row in every layer and head: per image patch
    (maps/*.npz), and its mass on image tokens, text tokens and the first token (the
    usual attention sink); compares the object's share of the image attention with its
    share of the image tokens; writes an interactive viewer per image.

    Example: vislens attention --model toy --n 40 --query last --out runs/attention
    """
    with model_session(opts) as load:
        positive("--batch-size", batch_size)
        from vislens.experiments import attention as att

        config = att.AttentionConfig(setting=setting, query=query, viewers=viewers, seed=seed,
                                     batch_size=batch_size)
        config.validate()
        samples, config.area = open_samples(data, n, area or None, "large")
        vlm = load()
        summary = att.execute(vlm, samples, config, out, meta(opts, data, n),
                              progress=progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        per = summary["per_layer"]
        table = Table(title=f"attention of the {summary['query_label']} "
                      f"({summary['query_token']!r}; {opts.model}, {summary['n_images']} images)")
        for name in ("layer", "image", "text", f"first {summary['first_token']}"[:14],
                     "object share", "object area", "peak on obj"):
            table.add_column(name, justify="right")
        for layer in range(summary["n_layers"]):
            table.add_row(str(layer), fmt(per["image"][layer]), fmt(per["text"][layer]),
                          fmt(per["first"][layer]), fmt(summary["object_share"][layer]),
                          fmt(summary["area_share"][layer]),
                          fmt(summary["peak_on_object"][layer], 2))
        Console().print(table)
        print_funnel(summary)
        for page in summary["viewer"]:
            console.print(f"viewer: {page}")
