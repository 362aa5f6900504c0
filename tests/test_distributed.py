"""Runs sharded over Ray workers (`--workers N`, vislens.runs.ray_pool) on the toy.

One local Ray cluster for the module: 127.0.0.1 only, 2 CPUs, 2 workers, shut
down at the end. A sharded run must write the single-process run's rows, in its
order, and the same summary; a worker or a driver that dies mid-run loses no
finished part, and the rerun leaves no row twice and none out.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from vislens.cli import app  # noqa: E402
from vislens.data import open_dataset  # noqa: E402
from vislens.errors import VislensError  # noqa: E402
from vislens.experiments import ablation, attention, knockout, logit_lens, patching  # noqa: E402
from vislens.experiments.perception import artifacts, perceive, prefix, surface  # noqa: E402
from vislens.runs.ray_pool import RayPool  # noqa: E402

META = {"model": "toy"}
# The tests that start the local Ray cluster (~10 s on an idle 2-core CPU, a minute or more
# on a loaded one) are marked ray and slow: the full run only.
SMALL, LARGE = (0.0, 350.0), (350.0, float("inf"))


@pytest.fixture(scope="module")
def cluster():
    # Ray's memory monitor stops workers when the machine is 95% full, whoever filled it:
    # on a shared test machine that is another job, and these tests would fail for it
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, logging_level=logging.ERROR)
    # the crash helpers below are shipped by value: workers cannot import this test file
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    pool = RayPool.start("toy", workers=2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def local():
    from vislens.models import load

    return load("toy")


@contextmanager
def worker_threads():
    """torch at the pool's per-worker thread count (2 CPUs, 2 workers: 1): a float's last
    bits depend on the thread count (the continued patching passes show it, ~1e-7 of a
    share), so the single-process reference runs as each worker does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scenes():
    return open_dataset("shapesworld:1000", n=8)


@pytest.fixture(scope="module")
def expected(local, scenes, tmp_path_factory):
    """The single-process ablation rows the failure tests must end up with."""
    out = tmp_path_factory.mktemp("single")
    run_ablation(local, scenes, out)
    return rows(out)


def run_ablation(vlm, scenes, out, progress=None):
    config = ablation.AblationConfig(settings=("polling",), conditions=("object", "random-5"),
                                     area=SMALL)
    return ablation.execute(vlm, scenes[:6], config, out, META, progress=progress)


CASES = {
    "ablate": run_ablation,
    "knockout": lambda vlm, scenes, out: knockout.execute(
        vlm, scenes[:3], knockout.KnockoutConfig(settings=("polling",),
                                                 conditions=("object->last",), area=SMALL),
        out, META),
    "patch": lambda vlm, scenes, out: patching.execute(
        vlm, scenes[:3], patching.PatchConfig(layers="0,2", token_layers="1", area=SMALL,
                                              maps=1), out, META),
    "logit-lens": lambda vlm, scenes, out: logit_lens.execute(
        vlm, scenes[:5], logit_lens.LensConfig(area=LARGE, batch_size=2, viewers=1), out, META),
    "attention": lambda vlm, scenes, out: attention.execute(
        vlm, scenes[:5], attention.AttentionConfig(area=LARGE, batch_size=2, viewers=1), out,
        META),
    "perceive": lambda vlm, scenes, out: perceive.execute(
        vlm, perceive.PerceiveConfig(tasks=("co-seg", "sem-seg"), n=3, batch_size=2), out, META),
    "prefix": lambda vlm, scenes, out: prefix.execute(
        vlm, perceive.PerceiveConfig(tasks=("ref-seg",), n=3, batch_size=2, prefix="classes"),
        out, META),
    "artifacts": lambda vlm, scenes, out: artifacts.execute(
        vlm, artifacts.ArtifactsConfig(
            n_images=2, batch_size=2, min_score=0.0,
            perceive=perceive.PerceiveConfig(tasks=("ref-seg",), n=3, batch_size=2),
            mc=surface.SurfaceConfig(n=3, batch_size=2)), out, META),
    "surface": lambda vlm, scenes, out: surface.execute(
        vlm, surface.SurfaceConfig(n=4, batch_size=2), out, META),
}


def rows(out: Path) -> list[dict]:
    """Every row of a run directory, parts in name order (what summaries read)."""
    found = []
    for part in sorted((Path(out) / "rows.parquet").glob("part-*.parquet")):
        found.extend(pq.read_table(part).to_pylist())
    return found


def same_summary(a: dict, a_dir: Path, b: dict, b_dir: Path) -> bool:
    """Equal but for the run directory inside the paths of plots and viewers."""
    return json.dumps(a, default=str).replace(str(a_dir), "OUT") == \
        json.dumps(b, default=str).replace(str(b_dir), "OUT")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.ray
@pytest.mark.slow
def test_a_sharded_run_is_the_single_process_run_row_for_row(name, pool, local, scenes,
                                                             tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    with worker_threads():
        expected = CASES[name](local, scenes, single)
    got = CASES[name](pool, scenes, sharded)
    assert rows(sharded) == rows(single) and rows(single)
    assert same_summary(got, sharded, expected, single)
    assert json.loads((sharded / "config.json").read_text()) == \
        json.loads((single / "config.json").read_text())
    assert sorted(p.relative_to(sharded) for p in sharded.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file())


@pytest.mark.ray
@pytest.mark.slow
def test_the_cli_runs_on_one_worker(cluster, local, tmp_path):
    """--workers 1 joins the running cluster (the test's own), one actor does every unit."""
    args = ["logit-lens", "--n", "4", "--batch-size", "2", "--viewers", "0", "--json"]
    one = CliRunner().invoke(app, [*args, "--workers", "1", "--out", str(tmp_path / "w")])
    zero = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "z")])
    assert one.exit_code == 0 and zero.exit_code == 0, one.output + zero.output
    assert rows(tmp_path / "w") == rows(tmp_path / "z")
    assert json.loads(one.stdout)["hit_rate"] == json.loads(zero.stdout)["hit_rate"]
    assert ray.is_initialized()  # a cluster the command did not start is left running


def no_duplicates(found: list[dict], key: tuple[str, ...]) -> bool:
    keys = [tuple(r[k] for k in key) for r in found]
    return len(keys) == len(set(keys))


class Interrupt:
    """A progress bar whose driver is stopped (Ctrl-C) once `after` units have finished."""

    def __init__(self, after: int):
        self.after = after

    def __call__(self, items, label):
        for done, item in enumerate(items):
            if done == self.after:
                raise KeyboardInterrupt
            yield item


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_driver_loses_no_finished_part(pool, scenes, expected, tmp_path):
    sharded = tmp_path / "sharded"
    with pytest.raises(KeyboardInterrupt):
        run_ablation(pool, scenes, sharded, progress=Interrupt(after=2))
    kept = rows(sharded)
    assert kept and len(kept) < len(expected)
    assert not (sharded / "summary.json").exists()
    assert pool.workers == 2  # the busy worker was stopped and replaced
    run_ablation(pool, scenes, sharded)
    assert sorted(map(json.dumps, rows(sharded))) == sorted(map(json.dumps, expected))
    assert no_duplicates(rows(sharded), ("sample", "setting", "condition"))
    assert all(r in rows(sharded) for r in kept)


class CrashAt:
    """A unit function whose worker process dies (no cleanup, like SIGKILL) on unit
    `unit`, once: the marker file says it already happened."""

    def __init__(self, fn, unit: int, marker: Path):
        self.fn, self.unit, self.marker = fn, unit, marker

    def __call__(self, vlm, out, unit, *args):
        if unit[0] >= self.unit and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return self.fn(vlm, out, unit, *args)


def crashing(pool, marker: Path, unit: int):
    """pool.map whose function crashes its worker once (ablation units are (idx, ...))."""
    plain = pool.map

    def map(fn, units, *args, **kwargs):
        return plain(CrashAt(fn, unit, marker), units, *args, **kwargs)
    return map


@pytest.mark.ray
@pytest.mark.slow
def test_killed_workers_lose_nothing(pool, local, scenes, expected, tmp_path, monkeypatch):
    """Last of the tests on the module's pool: it kills both its workers."""
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setattr(pool, "map", crashing(pool, tmp_path / "crashed", unit=2))
    run_ablation(pool, scenes, first)  # the dead worker's unit went to the other one
    assert (tmp_path / "crashed").exists() and pool.workers == 1
    assert rows(first) == expected
    parts = sorted((first / "rows.parquet").iterdir())
    run_ablation(pool, scenes, first)  # the rerun finds nothing left to do
    assert sorted((first / "rows.parquet").iterdir()) == parts
    assert no_duplicates(rows(first), ("sample", "setting", "condition"))

    monkeypatch.setattr(pool, "map", crashing(pool, tmp_path / "crashed-too", unit=3))
    with pytest.raises(VislensError, match="every Ray worker died; rerun"):
        run_ablation(pool, scenes, second)
    assert pool.workers == 0 and 0 < len(rows(second)) < len(expected)
    run_ablation(local, scenes, second)  # resumed in one process: every row, once
    assert rows(second) == expected


@pytest.mark.slow  # a fresh interpreter imports vislens and runs a command
def test_importing_vislens_and_running_a_command_never_imports_ray(tmp_path):
    code = ("import sys\nfrom vislens.cli import app\n"
            "code = app(['logit-lens', '--n', '4', '--viewers', '0', '--json', '--out', "
            "sys.argv[1]], standalone_mode=False)\nassert not code, code\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file()


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("option, message", [
    (["--workers", "-1"], "--workers must be 0"),
    (["--ray", "nonsense"], "no cluster address"),
    (["--ray", "127.0.0.1:1"], "no Ray cluster answers there"),
])
def test_bad_scale_out_options_are_one_line_and_write_nothing(option, message, tmp_path):
    out = tmp_path / "run"
    for command in (["knockout"], ["perceive"], ["study"]):
        result = CliRunner().invoke(app, [*command, *option, "--out", str(out)])
        assert message in one_line_error(result)
    assert not out.exists()


def test_without_ray_installed_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(app, ["ablate", "--workers", "2", "--out", str(tmp_path / "r")])
    assert "pip install 'vislens[ray]'" in one_line_error(result)
    assert not (tmp_path / "r").exists()


@pytest.fixture
def listener():
    """An address something answers on (the check before Ray connects is a TCP connect)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("env, message", [
    ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_MODE=token but no token is set here"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nonexistent/token"},
     "RAY_AUTH_TOKEN_PATH names /nonexistent/token, which is missing or empty"),
])
def test_token_mode_without_a_token_is_one_line_before_any_connection(env, message, listener,
                                                                       tmp_path, monkeypatch):
    """Ray's C++ client aborts the process on it; vislens says what to set."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["knockout", "--ray", listener, "--out",
                                      str(tmp_path / "run")])
    assert message in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_the_token_is_looked_for_where_ray_looks_and_never_read_out(tmp_path, monkeypatch):
    from vislens.runs.ray_cluster import token_source as _token_source

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert _token_source() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret-a\n")
    assert _token_source() == str(tmp_path / ".ray" / "auth_token")
    (tmp_path / "other").write_text("secret-b")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "other"))
    assert _token_source() == f"RAY_AUTH_TOKEN_PATH ({tmp_path / 'other'})"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert _token_source() is None  # Ray does not fall back to ~/.ray/auth_token either
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-c")
    assert _token_source() == "RAY_AUTH_TOKEN"
