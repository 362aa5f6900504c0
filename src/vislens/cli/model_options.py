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

from vislens.cli.common import (
    DEVICE_MAP_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    JSON_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_OPTION,
    RAY_OPTION,
    WORKERS_OPTION,
    placement,
    quiet,
    scale_out,
    user_errors,
)


@dataclass(frozen=True)
class ModelOptions:
    """What a command was told about its model: which, where, in what dtype, over how
    many workers, and whether it speaks JSON. Defaults are the options' defaults, so that
    code calling a command's function directly gets what the command line would."""

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
assert {f.name for f in fields(ModelOptions)} == \
    {name for name, _, _ in (_MODEL, *_PLACEMENT, *_SCALE_OUT, _JSON)}


def model_options(command: Callable | None = None, *, workers: bool = True):
    """Decorate a command whose first or any parameter is `opts: ModelOptions`.

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


def load_model(model: str, device: str, dtype: str | None, **where):
    """The model in this process (tests swap it for a ready one); where: a device map and
    its memory caps (common.placement), in place of `device`."""
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
    """models: the vislens.distributed.Models of the session."""
    return models.load(opts.model, opts.device, opts.dtype, local=load_model,
                       **placement(opts.device, opts.device_map, opts.max_memory))
