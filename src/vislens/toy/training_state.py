"""Resumable state of a toy training run, so Ctrl-C costs a few steps, not a stage.

A stage file (`stage_<X>.pt`) only exists once a stage ends, and one stage of
the shipped recipe takes tens of minutes on a CPU, so a run stopped mid-stage
used to start over. `state.pt` in the run's work directory is written every
`save_every` steps and at each stage end, and holds everything the next step
depends on: weights, optimizer and schedule, stage and step, every random
generator, the scene stream's position and the log. A rerun of the same
command loads it and takes the very trajectory the uninterrupted run would
have taken (the tests check that final weights match bit for bit).

Files are written to a temporary name and renamed, so a kill mid-write leaves
the previous state whole.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vislens.errors import VislensError

STATE_NAME = "state.pt"
# recipe fields that change how a run is carried out, not what it computes
_NOT_IDENTITY = ("save_every", "threads")


def run_identity(family: str, seed: int, recipe: Any) -> dict:
    """What a saved state must share with a rerun to be continued by it."""
    fields = {k: v for k, v in asdict(recipe).items() if k not in _NOT_IDENTITY}
    # JSON round trip: tuples and lists, paths and strings compare alike after a reload
    return json.loads(json.dumps({"family": family, "seed": seed, "recipe": fields},
                                 default=str))


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save` that never leaves a half-written `path`: whole new file or the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C mid-write included: the old file stays as it was
        tmp.unlink(missing_ok=True)
        raise


def atomic_lines(path: Path, rows: Iterable[dict]) -> None:
    """Rewrite a JSON-lines log to exactly `rows` (what a resumed run has really done)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


class RunState:
    """The state file of one run's work directory and the live objects it snapshots.

    `origin` is the stage file a run was started from (`--resume`), None for a
    run from scratch; it is kept in the state so that a rerun naming another
    stage file is refused rather than silently ignored.
    """

    def __init__(self, work: Path, identity: dict, origin: str | Path | None = None,
                 every: int = 100):
        self.work = Path(work)
        self.path = self.work / STATE_NAME
        self.identity = identity
        self.origin = str(Path(origin).resolve()) if origin is not None else None
        self.every = every
        self.seconds_before = 0.0
        self.started = time.time()
        self._live: dict = {}

    def load(self) -> dict | None:
        """The saved state of an interrupted run, None if there is none.

        Called before anything is written, so a refused rerun changes nothing.
        """
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        differ = _differences(state["identity"], self.identity)
        if differ:
            raise VislensError(
                f"{self.work} holds an interrupted train-toy run with a different "
                f"{', '.join(differ)}; rerun it with its own options to resume it, or delete "
                f"{self.work} to start afresh")
        if self.origin is not None and state["origin"] != self.origin:
            began = f"from {state['origin']}" if state["origin"] else "from scratch"
            raise VislensError(
                f"{self.work} holds an interrupted train-toy run that began {began}; rerun "
                f"without --resume to continue it, or delete {self.work} to start from "
                f"{self.origin}")
        self.origin = state["origin"]
        self.seconds_before = state["seconds"]
        return state

    def bind(self, model: torch.nn.Module, oracle: torch.nn.Module, rng: np.random.Generator,
             stream, log: dict) -> None:
        """The objects whose state `save` snapshots and `restore` overwrites."""
        self._live = {"model": model, "oracle": oracle, "rng": rng, "stream": stream,
                      "log": log}

    def restore(self, state: dict) -> set[str]:
        """Put a loaded state into the bound objects; returns the finished stages.

        Call it after everything that draws random numbers while being built
        (model, oracle head, pools), so the generators end up as they were saved.
        """
        live = self._live
        live["model"].load_state_dict(state["model"])
        live["oracle"].load_state_dict(state["oracle"])
        live["log"].clear()
        live["log"].update(state["log"])
        live["stream"].restore(state["stream"])
        rngs = state["rng"]
        torch.set_rng_state(rngs["torch"])
        np.random.set_state(rngs["numpy_global"])
        random.setstate(rngs["python"])
        live["rng"].bit_generator.state = rngs["numpy"]
        return set(state["done"])

    def due(self, done_steps: int, steps: int) -> bool:
        """Whether to save after `done_steps` of a stage (its end is saved by the caller)."""
        return self.every > 0 and done_steps % self.every == 0 and done_steps < steps

    def seconds(self) -> float:
        """Training time so far, the interrupted runs' included."""
        return self.seconds_before + time.time() - self.started

    def save(self, done: set[str], stage: str | None = None, step: int = 0,
             optimizer: torch.optim.Optimizer | None = None, scheduler=None,
             **extra: Any) -> None:
        """Save after `step` steps of `stage` (None: between stages, after `done`)."""
        live = self._live
        atomic_save({
            "identity": self.identity, "origin": self.origin, "done": sorted(done),
            "stage": stage, "step": step,
            "model": live["model"].state_dict(), "oracle": live["oracle"].state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": live["rng"].bit_generator.state,
                    "numpy_global": np.random.get_state(), "python": random.getstate()},
            "stream": live["stream"].state(), "log": live["log"], "seconds": self.seconds(),
            **extra,
        }, self.path)

    def discard(self) -> None:
        """Remove the state once the run's results are written."""
        self.path.unlink(missing_ok=True)
        self.path.with_name(f".{self.path.name}.tmp").unlink(missing_ok=True)


def _differences(saved: dict, now: dict) -> list[str]:
    out = [k for k in ("family", "seed") if saved.get(k) != now.get(k)]
    old, new = saved.get("recipe", {}), now.get("recipe", {})
    fields = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if fields:
        out.append(f"recipe ({', '.join(fields)})")
    return out
