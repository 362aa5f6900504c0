"""Where an experiment's units run: `executor(vlm)`.

Experiments are written once, against an executor: `Local` runs their units in this
process one after another, `vislens.runs.ray_pool.RayPool` hands the same units to the
same unit functions on its actors (its module says how parts, resume and failures go).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vislens.runs.handle import ModelHandle
from vislens.runs.ray_pool import RayPool


class Local:
    """The single-process executor: every unit here, in order, on the loaded model."""

    def __init__(self, vlm):
        self.vlm = vlm

    @property
    def info(self) -> ModelHandle:
        """What summaries read of the model (name, num_layers, family): the model itself."""
        return self.vlm

    def call(self, fn: Callable, *args, progress: Callable | None = None) -> Any:
        return fn(self.vlm, *args) if progress is None else fn(self.vlm, *args, progress=progress)

    def map(self, fn: Callable, units: Sequence, *args, out=None,
            progress: Callable | None = None, label: str = "") -> list:
        """fn(vlm, out, unit, *args) for every unit; `out` (a RunDir) is flushed after each,
        so a unit's rows form one part."""
        units = list(units)
        results = []
        for unit in (progress(units, label) if progress is not None and units else units):
            results.append(fn(self.vlm, out, unit, *args))
            if out is not None:
                out.flush()
        return results


def executor(vlm: ModelHandle) -> Local | RayPool:
    """What experiments run their units on: a RayPool passed in place of the model, or the
    model itself in this process."""
    return vlm if isinstance(vlm, RayPool) else Local(vlm)
