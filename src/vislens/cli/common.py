"""What every command shares: one-line errors, --json output, progress bars, option help
(the options of the commands that run a model are in model_options)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from vislens.errors import VislensError
from vislens.progress import progress_bar

console = Console(stderr=True, soft_wrap=True)

MODEL_HELP = '"toy", "toy-qwen" or a local Hugging Face model directory'
JSON_HELP = "print the summary as JSON on stdout (nothing else goes to stdout)"
# declared once (typer reads them, never changes them); the other model options are in
# model_options
MODEL_OPTION = typer.Option("toy", help=MODEL_HELP)
JSON_OPTION = typer.Option(False, "--json", help=JSON_HELP)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can fix into one line + exit code 2 instead of a traceback."""
    try:
        yield
    except (VislensError, FileNotFoundError, ValueError) as err:
        console.print(f"[bold red]error:[/] {escape(one_line(err))}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume from its last saved step")
        raise typer.Exit(130) from None
    except RuntimeError as err:  # torch raises OOM as RuntimeError subclasses
        if not any(m in str(err).lower() for m in ("out of memory", "can't allocate memory")):
            raise
        console.print(f"[bold red]error:[/] {OUT_OF_MEMORY}", highlight=False)
        raise typer.Exit(2) from None


def one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, FileNotFoundError) and err.filename:
        text = f"no such file or directory: {err.filename}; check the path"
    return " ".join(text.split())


OUT_OF_MEMORY = ("out of memory on the chosen device: lower --batch-size, pass --dtype "
                 "bfloat16, or spread the model over more devices with --device-map auto "
                 "(--max-memory to cap each)")
def positive(name: str, value: int) -> None:
    if value < 1:
        raise VislensError(f"{name} must be at least 1 (got {value})")


def emit(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@contextmanager
def quiet(as_json: bool) -> Iterator[None]:
    """With --json, stderr stays quiet too: no transformers loading bars or warnings (errors
    still print as one line)."""
    if not as_json:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def progress_for(as_json: bool):
    """The progress bar of a command: none in --json mode."""
    return None if as_json else progress


def progress(items: Iterable, label: str) -> Iterator:
    """A rich progress bar on stderr around any iterable (quiet when stderr is no terminal)."""
    items = list(items)
    with progress_bar(console) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def parse_area(text: str | None) -> tuple[float, float] | None:
    """--area "MIN:MAX" (either side may be empty) -> (min, max) in original pixels."""
    if not text:
        return None
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (float(lo) if lo else 0.0, float(hi) if hi else float("inf"))
    except ValueError:
        raise VislensError(
            f"--area must look like MIN:MAX in pixels (e.g. 50:300), got {text!r}") from None
