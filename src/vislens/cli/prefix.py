"""`vislens prefix`: Liu et al. B3, a text prefix before the image."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli.common import emit, fmt, positive, progress_for
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
def prefix(
    opts: ModelOptions,
    text: str = typer.Option("classes", "--prefix",
                             help="text before the image: 'classes' (the data set's class "
                                  "list, the same for every item, cut to --max-prefix-tokens "
                                  "in the data set's order), 'classes-oracle' (only the "
                                  "item's classes) or 'task-oracle' (the task in words, "
                                  "naming the item's class): both oracles leak the answer; "
                                  "or any text"),
    max_prefix_tokens: int = typer.Option(64, help="longest 'classes' prefix in tokens; a "
                                                   "longer class list keeps its first classes"),
    data: list[str] = typer.Option(None, help=DATA_HELP),
    tasks: str = typer.Option(ALL_TASKS, help=TASKS_HELP),
    n: int = typer.Option(20, "--n", help="items per task"),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    out: Path = typer.Option(Path("runs/prefix"), help="run directory (resumable)"),
    seed: int = typer.Option(0, help="seed for clustering, the selection split and the "
                                     "bootstrap intervals"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
) -> None:
    """Re-run perceive with a text prefix before the image; report the change (Liu et al. B3).

    Example: vislens prefix --model toy --out runs/prefix
    """
    with model_session(opts) as load:
        from vislens.experiments.perception import prefix as exp
        from vislens.experiments.perception.prefix import check_prefix

        positive("--max-prefix-tokens", max_prefix_tokens)
        check_prefix(text)
        pcfg = perceive_config(tasks, data, seed, n, layers, batch_size)
        config = exp.PrefixConfig(perceive=pcfg, prefix=text,
                                  max_prefix_tokens=max_prefix_tokens)
        vlm = load()
        check_layers(vlm, pcfg.layers)
        summary = exp.execute(vlm, config, out, meta(opts.model, vlm), progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        label = f"{text!r} (ORACLE: names the answer)" if summary["oracle"] else repr(text)
        Console().print(perception_table(summary["prefixed"],
                                           f"{opts.model}: with prefix {label}"))
        Console().print(layer_table(summary["delta"], "change with the prefix (prefix - clean, "
                                      "all items)", signed=True))
        key = "oracle_headline" if summary["oracle"] else "headline"
        Console().print(headline_table(summary[key], "ORACLE change" if summary["oracle"]
                                       else "change with the prefix"))


def headline_table(headline: dict, what: str) -> Table:
    """Per task: the change of the values at the layer chosen on the selection half,
    measured on the evaluation half, with its interval and both halves' item counts."""
    table = Table(title=f"{what} (values): layer chosen on a selection half, change on the "
                        "other half (95% bootstrap CI; no effect = 0; n s/e = items selecting / "
                        "evaluating)")
    for col in ("task", "layer", "before", "after", "change", "95% CI", "n s/e"):
        table.add_column(col, justify="right" if col != "task" else "left", no_wrap=True)
    for task, e in headline.items():
        v = e.get("values") or {}
        ci = v.get("ci95")
        table.add_row(task, "-" if v.get("layer") is None else f"L{v['layer']}",
                      fmt(v.get("before")), fmt(v.get("after")), fmt(v.get("delta")),
                      "-" if not ci else f"{ci[0]:+.2f}..{ci[1]:+.2f}",
                      f"{v.get('n_select', 0)}/{v.get('n_eval', 0)}")
    return table
