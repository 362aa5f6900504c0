"""The options of every command that runs a model, declared once, and the one way they
open it.

typer builds a command's options from its function's signature and has no notion of a
group of options, so `model_options` writes the shared ones into the signature: a
command names `opts: ModelOptions` where --model goes in its --help and gets the other
shared options (--device ... --json) last, in the order they always had; typer's calls
are folded back into one ModelOptions. The alternatives cost more: repeating eight
parameters in every signature is what this replaced, and a typer callback would move
the options before the command's name on the command line.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import typer

from vislens.cli.common import JSON_OPTION, MODEL_OPTION, quiet, user_errors
from vislens.errors import VislensError

DEVICE_HELP = "torch device, e.g. cpu, cuda or cuda:1"
DTYPE_HELP = "float32, bfloat16 or float16 (default: the dtype the checkpoint was saved in)"
DEVICE_OPTION = typer.Option("cpu", help=DEVICE_HELP)
DTYPE_OPTION = typer.Option(None, help=DTYPE_HELP)
DEVICE_MAP_HELP = ("spread a model too large for one GPU over every GPU, then the CPU, with "
                   "accelerate: auto, balanced, balanced_low_0 or sequential (replaces --device)")
MAX_MEMORY_HELP = ('with --device-map, the memory each device may hold, e.g. '
                   '"0=70GiB,1=70GiB,cpu=200GiB"')
DEVICE_MAP_OPTION = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP)
MAX_MEMORY_OPTION = typer.Option(None, "--max-memory", metavar="DEVICE=SIZE,...",
                                 help=MAX_MEMORY_HELP)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
WORKERS_HELP = ("share the images out over N Ray workers on this machine, one model each "
                "(one GPU each with --device cuda); 0 = this process alone. Needs "
                "pip install 'vislens\\[ray]'")
RAY_HELP = ("run the workers on the Ray cluster at ADDRESS (HOST:PORT, ray://HOST:PORT or "
            "auto; default one per GPU, or per node on CPUs); --out must be on a filesystem "
            "every node sees. A cluster with token authentication needs RAY_AUTH_MODE=token "
            "and its token (docs/scale-out.md)")
WORKERS_OPTION = typer.Option(0, "--workers", help=WORKERS_HELP)
RAY_OPTION = typer.Option("", "--ray", metavar="ADDRESS", help=RAY_HELP)


@dataclass(frozen=True)
class ModelOptions:
    """What a command was told about its model: which, where, in what dtype, over how
    many workers, and whether it speaks JSON. The defaults are the options' (`study`
    needs a default instance in its signature, see there)."""

    model: str = "toy"
    device: str = "cpu"
    device_map: str | None = None
    max_memory: str | None = None
    dtype: str | None = None
    workers: int = 0
    ray: str = ""
    as_json: bool = False


# (name, type, typer option) in --help order after the command's own options; the types
# are the ones typer always saw (`str` even where None is the default), so --help is unchanged
_MODEL = ("model", str, MODEL_OPTION)
_PLACEMENT = (("device", str, DEVICE_OPTION), ("device_map", str, DEVICE_MAP_OPTION),
              ("max_memory", str, MAX_MEMORY_OPTION), ("dtype", str, DTYPE_OPTION))
_SCALE_OUT = (("workers", int, WORKERS_OPTION), ("ray", str, RAY_OPTION))
_JSON = ("as_json", bool, JSON_OPTION)
# a field without an option (or the reverse) would fail only when a command runs
assert {f.name for f in fields(ModelOptions)} == \
    {name for name, _, _ in (_MODEL, *_PLACEMENT, *_SCALE_OUT, _JSON)}


def model_options(command: Callable | None = None, *, workers: bool = True):
    """Decorate a command that takes `opts: ModelOptions`: --model is listed where `opts`
    stands, the other shared options after the command's own.

    workers=False: the command runs in this process only, so --workers / --ray are not
    offered (its ModelOptions keeps their defaults: no Ray)."""
    if command is None:
        return functools.partial(model_options, workers=workers)
    shared = (*_PLACEMENT, *(_SCALE_OUT if workers else ()), _JSON)
    names = [name for name, _, _ in (_MODEL, *shared)]
    signature = inspect.signature(command, eval_str=True)
    own = list(signature.parameters.values())
    at = [p.name for p in own].index("opts")

    def option(name, kind, default):
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 default=default, annotation=kind)

    params = [*own[:at], option(*_MODEL), *own[at + 1:], *(option(*s) for s in shared)]

    @functools.wraps(command)
    def run(**given: Any) -> Any:
        opts = ModelOptions(**{name: given.pop(name) for name in names})
        return command(opts=opts, **given)

    run.__signature__ = signature.replace(parameters=params)
    annotations = {k: v for k, v in command.__annotations__.items() if k != "opts"}
    run.__annotations__ = {**annotations, **{p.name: p.annotation for p in params
                                             if p.name in names}}
    return run


@contextmanager
def scale_out(workers: int, address: str) -> Iterator[Any]:
    """--workers / --ray checked now, before anything is loaded; yields a
    vislens.runs.ray_pool.Models whose load() gives the model or a pool of Ray workers,
    shut down when the command ends (Ray is imported only when one is asked for)."""
    from vislens.runs.ray_pool import Models

    models = Models(workers, address or None)
    try:
        yield models
    finally:
        models.close()


def placement(device: str, device_map: str | None, max_memory: str | None) -> dict[str, Any]:
    """An accelerate device map and its memory caps as vislens.models.load's keywords ({}:
    the model goes whole on --device), checked before anything loads."""
    if device_map is None:
        if max_memory is not None:
            raise VislensError("--max-memory caps the devices of a --device-map: pass "
                               "--device-map auto with it")
        return {}
    if device_map not in DEVICE_MAPS:
        raise VislensError(f"--device-map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    if device != "cpu":
        raise VislensError("--device-map places the model itself: leave out --device")
    from vislens.models.loading import parse_max_memory

    return {"device_map": device_map, "max_memory": parse_max_memory(max_memory)}


def load_model(model: str, device: str, dtype: str | None, **where):
    """The model in this process (tests swap it for a ready one); where: a device map and
    its memory caps (placement), in place of `device`."""
    from vislens.models import load

    return load(model, device=device, dtype=dtype, **where)


@contextmanager
def model_session(opts: ModelOptions) -> Iterator[Callable[[], Any]]:
    """The frame of a model command: user-fixable errors as one line, a quiet stderr with
    --json, --workers / --ray checked at once and their pool shut down at the end. Yields
    the function that loads the model, called once the command's own options have passed
    their checks (so that a typo costs no model load); it checks --device-map /
    --max-memory first and gives the model here or a pool of Ray workers."""
    with user_errors(), quiet(opts.as_json), scale_out(opts.workers, opts.ray) as models:
        yield functools.partial(open_model, opts, models)


def open_model(opts: ModelOptions, models) -> Any:
    """The model model_session yields the loader of (models: its
    vislens.runs.ray_pool.Models); --device-map / --max-memory are checked only here, after
    the command's own options, as they always were."""
    return models.load(opts.model, opts.device, opts.dtype, local=load_model,
                       **placement(opts.device, opts.device_map, opts.max_memory))
