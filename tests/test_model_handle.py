"""vislens.runs.handle.ModelHandle: what an experiment may read of its `vlm` outside its
units, present on both things passed as `vlm` (a loaded VLM and a Ray pool of them)."""

from __future__ import annotations

import pytest

import vislens
from vislens.models.families.base import Family
from vislens.runs.handle import ModelHandle
from vislens.runs.local import Local, executor
from vislens.runs.ray_pool import RayPool

MEMBERS = {"name", "model_type", "family", "num_layers", "require_layout"}


@pytest.fixture(scope="module")
def toy():
    return vislens.load("toy")


def pool_like(toy) -> RayPool:
    """A RayPool as start() builds it once its actors answered (no actor, no Ray started)."""
    return RayPool(toy.name, "cpu", [], {}, False, toy.model_type, toy.num_layers)


def handles(toy):
    return {"VLM": toy, "RayPool": pool_like(toy)}


@pytest.mark.parametrize("missing", sorted(MEMBERS))
def test_the_protocol_requires_each_member(toy, missing):
    """Every member is required: something lacking any one of them is no ModelHandle."""
    members = {m: getattr(toy, m) for m in MEMBERS - {missing}}
    assert isinstance(type("All", (), {m: getattr(toy, m) for m in MEMBERS})(), ModelHandle)
    assert not isinstance(type("Lacking", (), members)(), ModelHandle)


@pytest.mark.parametrize("kind", ["VLM", "RayPool"])
def test_vlm_and_pool_are_model_handles(toy, kind):
    handle = handles(toy)[kind]
    assert isinstance(handle, ModelHandle)
    assert isinstance(handle.family, Family)
    assert isinstance(handle.num_layers, int) and handle.num_layers == toy.num_layers
    assert handle.model_type == toy.model_type == handle.family.model_type
    assert handle.name == toy.name
    handle.require_layout("maps pixels to tokens")  # the toy has a layout: no error


def test_executor_runs_a_vlm_here_and_takes_a_pool_as_it_is(toy):
    assert isinstance(executor(toy), Local) and executor(toy).info is toy
    pool = pool_like(toy)
    assert executor(pool) is pool and isinstance(executor(pool).info, ModelHandle)
