"""`vislens train-toy`: retrain a toy VLM on ShapesWorld."""

from __future__ import annotations

from pathlib import Path

import typer

from vislens.cli.common import JSON_OPTION, console, emit, user_errors
from vislens.errors import VislensError


def train_toy(
    out: Path = typer.Option(..., help="directory for the trained model (save_pretrained)"),
    seed: int = typer.Option(0, help="training seed"),
    family: str = typer.Option("llava", help="llava (the `toy`) or qwen (the `toy-qwen`)"),
    resume: Path = typer.Option(None, help="start from a stage_<X>.pt (a run leaves one "
                                "per stage) and run only the stages after X; an "
                                "interrupted run resumes on a plain rerun"),
    donor: Path = typer.Option(None, help="qwen: the LLaVA toy directory whose language "
                               "model toy-qwen starts from (default: the shipped toy)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train a toy VLM on ShapesWorld (llava: from scratch; qwen: from the LLaVA toy's LM).

    Example: vislens train-toy --out runs/toy --seed 0
    """
    with user_errors():
        if family == "llava":
            from vislens.toy.train import train
        elif family == "qwen":
            from vislens.toy.qwen_train import train
        else:
            raise VislensError(f"unknown toy family {family!r}; choose llava or qwen")
        kwargs: dict = {}
        if resume is not None:
            kwargs["resume"] = resume
        if donor is not None:
            if family != "qwen":
                raise VislensError("--donor is for --family qwen only")
            if not (donor / "config.json").is_file():
                raise VislensError(f"--donor {donor} has no config.json; pass a LLaVA toy "
                                   "directory (e.g. one written by `vislens train-toy`)")
            from vislens.toy.qwen_train import QwenRecipe

            kwargs["recipe"] = QwenRecipe(init_lm=str(donor))
        summary = train(out, seed=seed, **kwargs)
        emit(summary, as_json)
        if not as_json:
            console.print(f"trained toy saved to {out}; held-out accuracy "
                          f"{summary.get('held_out', {}).get('accuracy')}, with every image "
                          f"token ablated {summary.get('ablated_all_image_tokens', {})}")
