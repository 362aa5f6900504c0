"""`vislens patch`: causal tracing on image tokens, where the answer reads the object."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli.common import emit, fmt, progress_for
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
def patch(
    opts: ModelOptions,
    data: str = typer.Option(DEFAULT_DATA, help=DATA_HELP),
    n: int = typer.Option(100, "--n", help="number of images"),
    out: Path = typer.Option(Path("runs/patch"), help="run directory (rerun to resume)"),
    corrupt: str = typer.Option("color", help="color or shape: the exact ShapesWorld "
                                "counterfactual (the target's colour / shape changed); noise: "
                                "the object's pixels noised (any data, COCO included)"),
    kinds: str = typer.Option("residual", help="comma list of sites restored: residual, attn, "
                              "mlp"),
    groups: str = typer.Option("", help="comma list of token groups restored: object, "
                               "object+1, rest-of-image, last-row, question, answer-position "
                               "(default: every group the family maps; without a token "
                               "layout, question and answer-position)"),
    layers: str = typer.Option("all", help="layers whose sites are restored: all, or a comma "
                               "list of L and A-B (0-based)"),
    token_layers: str = typer.Option("auto", help="layers of the per-image-token comparison of "
                                     "attribution and exact patching: auto (4 evenly spaced), "
                                     "none, or a comma list"),
    area: str = typer.Option("", help="target area range MIN:MAX in pixels (default: knockout's "
                              "small objects)"),
    maps: int = typer.Option(3, help="per-token maps (PNG) and interactive viewers (HTML) of "
                             "the first N kept pairs"),
    exact_tokens: int = typer.Option(256, help="at most this many image tokens (evenly spaced) "
                                     "patched one at a time per token layer"),
    seed: int = typer.Option(0, help="seed of the noise corruption"),
) -> None:
    """Restore the clean run's activations, group by group, in a corrupted run.

    Each pair is a clean image and a corrupted one (the target's colour or shape changed,
    or its pixels noised) asked the same question; the share of the logit difference
    (answer - foil) restored is measured per site kind, layer and token group (object,
    object+1, rest of the image, last image row, question words, answer position), and per
    image token, attribution patching against exact patching.

    Example: vislens patch --model toy --n 40 --corrupt color --out runs/patch --json
    """
    with model_session(opts) as load:
        from vislens.experiments import patching

        config = patching.PatchConfig(corrupt=corrupt, kinds=names(kinds), groups=names(groups),
                                      layers=layers, token_layers=token_layers, seed=seed,
                                      maps=maps, exact_tokens=exact_tokens)
        config.validate()
        if config.corrupt != "noise" and data.partition(":")[0].lower() != "shapesworld":
            raise ValueError(f"--corrupt {corrupt} redraws ShapesWorld scenes exactly; use "
                             "--corrupt noise for other data")
        samples, config.area = open_samples(data, n, area or None, "small")
        vlm = load()
        summary = patching.execute(vlm, samples, config, out, meta(opts, data, n),
                                   progress=progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        for kind, by_group in summary["restored"].items():
            table = Table(title=f"share of the logit difference restored, {kind} ({opts.model}; "
                          f"{summary['n_pairs']} pairs; 0 = none, 1 = all)")
            table.add_column("group \\ layer")
            for x in summary["layers"]:
                table.add_column(str(x), justify="right")
            for g, curve in by_group.items():
                table.add_row(g, *[fmt(v, 2) for v in curve["mean"]])
            Console().print(table)
        for kind, by_layer in summary["attribution"].items():
            for layer, a in by_layer.items():
                Console().print(f"{kind} layer {layer}: attribution vs exact, Spearman "
                                f"{fmt(a['spearman'], 2)}, top-k overlap "
                                f"{fmt(a['topk_overlap'], 2)}, top-k restore "
                                f"{fmt(a['topk_restored'], 2)} ({a['n']} pairs)", highlight=False)
        for path in summary["viewers"]:
            Console().print(f"viewer: {path}", highlight=False)
        print_funnel(summary)
