"""`vislens prefix`: Liu et al. B3, a text prefix before the image."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from vislens.cli import perception as P
from vislens.cli import samples as S
from vislens.cli.common import (
    DEVICE_MAP_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    JSON_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_OPTION,
    RAY_OPTION,
    WORKERS_OPTION,
    emit,
    placement,
    progress_for,
    quiet,
    scale_out,
    user_errors,
)
from vislens.errors import VislensError


def prefix(
    model: str = MODEL_OPTION,
    text: str = typer.Option("task", "--prefix",
                             help="text before the image: 'task' (the task in words), "
                                  "'classes' (the data set's class names), 'classes-present' "
                                  "(only the classes in the image: an oracle) or any text"),
    data: list[str] = typer.Option(None, help=P.DATA_HELP),
    tasks: str = typer.Option(P.ALL_TASKS, help=P.TASKS_HELP),
    n: int = typer.Option(20, "--n", help="items per task"),
    layers: str = typer.Option("all", help=P.LAYERS_HELP),
    out: Path = typer.Option(Path("runs/prefix"), help="run directory (resumable)"),
    seed: int = typer.Option(0, help="seed for clustering and sampling"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
    device: str = DEVICE_OPTION,
    device_map: str = DEVICE_MAP_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    dtype: str = DTYPE_OPTION,
    workers: int = WORKERS_OPTION,
    ray: str = RAY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Re-run perceive with a text prefix before the image; report the change (Liu et al. B3).

    Example: vislens prefix --model toy --prefix classes --out runs/prefix
    """
    with user_errors(), quiet(as_json), scale_out(workers, ray) as models:
        from vislens.experiments.perception import prefix as exp

        if not text.strip():
            raise VislensError("--prefix is empty; give 'task', 'classes' or some text")
        config = P.perceive_config(tasks, data, seed, n, layers, batch_size, prefix=text)
        vlm = models.load(model, device, dtype, local=S.load_model,
                          **placement(device, device_map, max_memory))
        P.check_layers(vlm, config.layers)
        summary = exp.execute(vlm, config, out, P.meta(model, vlm), progress_for(as_json))
        if as_json:
            emit(summary, True)
            return
        Console().print(P.perception_table(summary["prefixed"], f"{model}: with prefix {text!r}"))
        Console().print(P.layer_table(summary["delta"], "change with the prefix (prefix - clean)",
                                      signed=True))
