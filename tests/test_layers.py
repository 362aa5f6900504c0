"""The layer contracts of pyproject.toml ([tool.importlinter]) hold, have teeth, and no
module of vislens takes part in an import cycle (function-local imports included)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports_command as lint; lint()"


def lint_imports(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on cwd's pyproject.toml, with the vislens found under `src`."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--no-logo"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_layer_contracts_are_kept():
    done = lint_imports(ROOT, ROOT / "src")
    assert done.returncode == 0, done.stdout + done.stderr
    assert " kept, 0 broken." in done.stdout, done.stdout


UPWARD = {  # module, line appended inside a function, what the broken contract says
    "models/vlm.py": ("from vislens.experiments.funnel import LABELS",
                      "vislens.models is not allowed to import vislens.experiments"),
    "experiments/funnel.py": ("from vislens.report import sections",
                              "vislens.experiments is not allowed to import vislens.report"),
    "toy/checks.py": ("from vislens.report import sections",
                      "vislens.toy is not allowed to import vislens.report"),
    "render/plots.py": ("from vislens.models import vlm",
                        "vislens.render is not allowed to import vislens.models"),
    "experiments/stats.py": ("import ray", "vislens.experiments is not allowed to import ray"),
}


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(UPWARD))
def test_an_upward_import_inside_a_function_breaks_them(module, tmp_path):
    """A copy of the sources with one import the layers forbid, hidden in a function."""
    shutil.copytree(ROOT / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("assets", "templates", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    line, says = UPWARD[module]
    path = tmp_path / "src" / "vislens" / module
    path.write_text(path.read_text() + f"\n\ndef _upward():\n    {line}  # noqa\n")
    done = lint_imports(tmp_path, tmp_path / "src")
    assert done.returncode == 1, done.stdout + done.stderr
    assert says in done.stdout, done.stdout


def cycles(graph: grimp.ImportGraph, depth: int | None = None) -> list[list[str]]:
    """Strongly connected components of more than one node: of modules (depth None) or of
    packages cut at `depth` dotted names (vislens.experiments, ...), each counted once."""
    def node(m: str) -> str:
        return m if depth is None else ".".join(m.split(".")[:depth])

    edges: dict[str, set[str]] = {node(m): set() for m in graph.modules}
    for m in graph.modules:
        for imported in graph.find_modules_directly_imported_by(m):
            a, b = node(m), node(imported)
            if a != b and not b.startswith(a + ".") and not a.startswith(b + "."):
                edges[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("vislens", cache_dir=None)  # function-local imports included


def test_no_import_cycle_among_vislens_modules_or_packages(graph):
    # function-local imports are in the graph: cli/study.py imports these inside study()
    assert graph.direct_import_exists(importer="vislens.cli.study",
                                      imported="vislens.experiments.study")
    deepest = max(m.count(".") for m in graph.modules) + 1
    for depth in (None, *range(2, deepest + 1)):
        assert cycles(graph, depth) == [], f"import cycle (depth {depth})"


def test_the_cycle_check_finds_a_cycle_once_there_is_one():
    graph = grimp.build_graph("vislens", cache_dir=None)
    graph.add_import(importer="vislens.runs.rundir", imported="vislens.experiments.stats")
    assert cycles(graph) == []  # stats imports nothing of runs: no cycle of modules
    assert cycles(graph, 2) == [["vislens.experiments", "vislens.runs"]]  # but of packages
    graph.add_import(importer="vislens.experiments.stats", imported="vislens.runs.rundir")
    assert cycles(graph) == [["vislens.experiments.stats", "vislens.runs.rundir"]]
