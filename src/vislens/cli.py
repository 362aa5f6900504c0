"""The `vislens` command: one sub-command per experiment, each with --help and --json.

Commands only parse options, call into `experiments` / `data` / `toy`, and
print; every user-fixable problem ends as one line on stderr with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vislens.cli_common import (
    DTYPE_HELP,
    JSON_HELP,
    MODEL_HELP,
    console,
    emit,
    positive,
    user_errors,
)
from vislens.errors import VislensError

app = typer.Typer(
    help="Look inside vision-language models. Every command runs offline on the embedded "
    "toy VLM + ShapesWorld by default.\n\nExample: vislens eval --model toy --n 50",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def info(
    model: str = typer.Option("toy", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Describe a model: family, layers, sizes, image-token grid, where the weights live.

    Example: vislens info --model toy-qwen
    """
    with user_errors():
        from vislens.models import load

        vlm = load(model)
        facts = _describe(vlm, model)
        if as_json:
            emit(facts, True)
            return
        table = Table(show_header=False)
        for key, value in facts.items():
            table.add_row(key, str(value))
        Console().print(table)


def _describe(vlm, model: str) -> dict:
    """Facts a researcher checks before trusting a run, read from the loaded model itself."""
    from PIL import Image

    from vislens.models.loading import resolve

    text = vlm.language_model.config
    vision = vlm.config.vision_config
    size = getattr(vision, "image_size", None) or 448
    batch = vlm.prepare([Image.new("RGB", (size, size))], ["describe this image ."])
    grids = batch.token_map.grids[0]
    return {
        "model": model,
        "family": vlm.family,
        "layers": vlm.num_layers,
        "hidden_size": text.hidden_size,
        "attention_heads": text.num_attention_heads,
        "vocab_size": text.vocab_size,
        "image_size": size,
        "image_token_grid": {str(tile): list(rc) for tile, rc in grids.items()},
        "image_tokens": len(batch.token_map),
        "parameters": sum(p.numel() for p in vlm.model.parameters()),
        "dtype": str(vlm.dtype).replace("torch.", ""),
        "weights": str(resolve(model).resolve()),
    }


@app.command("eval")
def eval_(
    model: str = typer.Option("toy", help=MODEL_HELP),
    n: int = typer.Option(50, "--n", help="number of fresh ShapesWorld scenes"),
    seed: int = typer.Option(1000, help="ShapesWorld seed (the toys were trained on seed 0)"),
    batch_size: int = typer.Option(32, help="scenes per forward pass"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Measure a model's accuracy on fresh ShapesWorld scenes in each setting.

    Check a model before you interpret it: generative (the target's name appears in
    the description), polling (yes / no, balanced), VQA (one word after a fixed prefix).

    Example: vislens eval --model toy --n 100 --seed 7 --json
    """
    with user_errors():
        positive("--n", n)
        positive("--batch-size", batch_size)
        from vislens.data import shapesworld
        from vislens.experiments.accuracy import evaluate
        from vislens.models import load

        shapesworld.check_held_out(seed)
        vlm = load(model, device=device)
        samples = shapesworld.generate(n, seed=seed)
        result = evaluate(vlm.model, vlm.processor, samples, batch_size=batch_size)
        summary = {"model": model, "seed": seed, **result}
        if as_json:
            emit(summary, True)
            return
        table = Table(title=f"{model}: accuracy on {n} ShapesWorld scenes (seed {seed})")
        table.add_column("setting")
        table.add_column("accuracy", justify="right")
        for setting, acc in result["accuracy"].items():
            table.add_row(setting, f"{acc:.3f}")
        Console().print(table)


@app.command()
def world(
    out: Path = typer.Option(..., help="directory to write (COCO layout)"),
    n: int = typer.Option(100, "--n", help="number of scenes"),
    seed: int = typer.Option(0, help="ShapesWorld seed"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write ShapesWorld scenes as a COCO instances data set plus questions.jsonl.

    Example: vislens world --out data/shapes --n 200 --seed 3
    """
    with user_errors():
        positive("--n", n)
        from vislens.data.world import write_world

        summary = write_world(out, n=n, seed=seed)
        if as_json:
            emit(summary, True)
        else:
            console.print(f"wrote {n} scenes to {out}")


@app.command("train-toy")
def train_toy(
    out: Path = typer.Option(..., help="directory for the trained model (save_pretrained)"),
    seed: int = typer.Option(0, help="training seed"),
    family: str = typer.Option("llava", help="llava (the `toy`) or qwen (the `toy-qwen`)"),
    resume: Path = typer.Option(None, help="start from a stage_<X>.pt (a run leaves one "
                                "per stage) and run only the stages after X; an "
                                "interrupted run resumes on a plain rerun"),
    donor: Path = typer.Option(None, help="qwen: the LLaVA toy directory whose language "
                               "model toy-qwen starts from (default: the shipped toy)"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
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


@app.command()
def study(
    out: Path = typer.Option(Path("runs/study"), help="study directory (rerun to resume)"),
    model: str = typer.Option("toy", help=MODEL_HELP),
    data: str = typer.Option("shapesworld:1000", help='"shapesworld[:SEED]"'),
    scale: float = typer.Option(1.0, help="multiply every step's number of images"),
    seed: int = typer.Option(0, help="seed for targets and random token sets"),
    device: str = typer.Option("cpu", help="torch device"),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Run every experiment with sensible defaults and write one self-contained report.

    Example: vislens study --out runs/demo   (then open runs/demo/report.html)
    """
    with user_errors():
        if scale <= 0:
            raise VislensError(f"--scale must be positive (got {scale})")
        from vislens.cli_common import progress
        from vislens.experiments.study import StudyConfig, run_study

        config = StudyConfig(model=model, data=data, scale=scale, seed=seed, device=device,
                             dtype=dtype)
        result = run_study(config, out, progress=progress,
                           log=lambda m: console.print(m, highlight=False))
        if as_json:
            emit(result, True)
            return
        console.print(f"study took {result['seconds']['total']:.0f} s; report: "
                      f"{result['report']}")


def _register() -> None:
    from vislens import cli_part_a, cli_part_b

    app.command("ablate")(cli_part_a.ablate)
    app.command("logit-lens")(cli_part_a.logit_lens)
    app.command("knockout")(cli_part_a.knockout)
    app.command("perceive")(cli_part_b.perceive)
    app.command("artifacts")(cli_part_b.artifacts)
    app.command("prefix")(cli_part_b.prefix)
    app.command("surface")(cli_part_b.surface)


_register()

if __name__ == "__main__":
    app()
