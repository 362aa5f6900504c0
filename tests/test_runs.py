import json

import pytest

from vislens.errors import VislensError
from vislens.runs.rundir import RunDir


def test_rows_resume_and_summary(tmp_path):
    run = RunDir(tmp_path, {"model": "toy", "seed": 0, "batch_size": 4}, key=["sample", "cond"])
    run.add({"sample": "a", "cond": "object", "correct": True})
    run.flush()
    run.add({"sample": "a", "cond": "random-5", "correct": False})
    run.write_summary({"drop": 0.5})
    again = RunDir(tmp_path, {"model": "toy", "seed": 0, "batch_size": 8}, key=["sample", "cond"])
    assert again.done(sample="a", cond="object")
    assert again.done(sample="a", cond="random-5")
    assert not again.done(sample="b", cond="object")
    assert len(again.rows()) == 2
    assert json.loads((tmp_path / "summary.json").read_text()) == {"drop": 0.5}
    assert not list(tmp_path.rglob("*.tmp"))


def test_refuses_to_mix_configs(tmp_path):
    run = RunDir(tmp_path, {"model": "toy", "seed": 0}, key=["sample"])
    run.add({"sample": "a"})
    run.flush()
    with pytest.raises(VislensError, match="different configuration"):
        RunDir(tmp_path, {"model": "toy", "seed": 1}, key=["sample"])


def test_nothing_is_written_before_the_first_result(tmp_path):
    """A run that fails before its first row (bad option, no data) leaves no directory, so
    the corrected rerun is not refused as a different configuration."""
    out = tmp_path / "run"
    RunDir(out, {"model": "toy", "seed": 0}, key=["sample"])
    assert not out.exists()
    RunDir(out, {"model": "toy", "seed": 1}, key=["sample"]).write_summary({})
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_numbered_parts_leave_gaps_and_a_later_flush_never_overwrites(tmp_path):
    """A sharded run numbers parts by unit (vislens.runs.ray_pool), so numbers can skip; the
    next plain flush goes past the highest, and a part written again under its own
    number replaces itself instead of adding its rows twice."""
    run = RunDir(tmp_path, {"model": "toy"}, key=["sample"])
    run.add({"sample": "c"})
    run.flush_as(2)
    run.add({"sample": "a"})
    run.flush_as(0)
    run.add({"sample": "d"})
    run.flush()
    assert sorted(p.name for p in run.rows_dir.iterdir()) == [
        "part-00000.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert [r["sample"] for r in run.rows()] == ["a", "c", "d"]
    other = RunDir(tmp_path, {"model": "toy"}, key=["sample"])
    other.add({"sample": "c"})
    other.flush_as(2)
    run.reload()
    assert [r["sample"] for r in run.rows()] == ["a", "c", "d"] and run.done(sample="c")
