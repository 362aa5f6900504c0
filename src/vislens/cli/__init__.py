"""The `vislens` command: one sub-command per experiment, each with --help and --json.

One module per command, named for it (`vislens perceive` lives in perceive.py);
`common` holds what every command shares, `model_options` the options of the commands
that run a model (--model ... --json) and the one way they open it, `image_inputs` the
data and target options of ablate / logit-lens / knockout / attention, `perception_options`
those of perceive / prefix / artifacts / surface. Commands only parse options, call into
experiments / data / toy, and print; every user-fixable problem ends as one line on stderr
with exit code 2.
"""

from __future__ import annotations

import typer

from vislens.cli.ablate import ablate
from vislens.cli.artifacts import artifacts
from vislens.cli.attention import attention
from vislens.cli.capture import capture
from vislens.cli.evaluate import evaluate
from vislens.cli.info import info
from vislens.cli.knockout import knockout
from vislens.cli.logit_lens import logit_lens
from vislens.cli.patch import patch
from vislens.cli.perceive import perceive
from vislens.cli.prefix import prefix
from vislens.cli.study import study
from vislens.cli.surface import surface
from vislens.cli.train_toy import train_toy
from vislens.cli.world import world

app = typer.Typer(
    help="Look inside vision-language models. Every command runs offline on the embedded "
    "toy VLM + ShapesWorld by default.\n\nExample: vislens eval --model toy --n 50",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMANDS = {
    "study": study, "eval": evaluate, "info": info, "world": world, "train-toy": train_toy,
    "ablate": ablate, "logit-lens": logit_lens, "knockout": knockout, "attention": attention,
    "perceive": perceive, "artifacts": artifacts, "prefix": prefix, "surface": surface,
    "capture": capture, "patch": patch,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)

__all__ = ["COMMANDS", "app"]
