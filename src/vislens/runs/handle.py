"""What an experiment may use of the model it is given, before its units run.

An experiment's entry points (`run`, `execute`, the study) take either a loaded
`vislens.models.vlm.VLM` or a `vislens.runs.ray_pool.RayPool` standing in for one.
Outside its units (which `vislens.runs.local.executor` runs on a real model, here or
on a worker) an experiment reads only what both have: the names below. Anything
else (tokenizer, prepare, forward, ...) belongs inside a unit.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from vislens.models.families.base import Family


@runtime_checkable
class ModelHandle(Protocol):
    """The model as an experiment's driver sees it: a VLM here or a pool of them."""

    @property
    def name(self) -> str:
        """What the model was loaded from (summaries name it)."""

    @property
    def model_type(self) -> str:
        """The config's model_type string ("qwen2_vl", ...)."""

    @property
    def family(self) -> Family:
        """The family object: layout, geometry, what the model can do."""

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model."""

    def require_layout(self, what: str) -> None:
        """Refuse, before any work, an experiment that maps pixels to tokens (`what` it
        does) on a family without a layout."""
