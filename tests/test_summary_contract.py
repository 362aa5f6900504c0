"""The summary keys the report reads are a written contract, not a shared habit.

Each experiment declares its summary.json as a TypedDict next to its `summarise`
(`KnockoutSummary` in experiments/knockout.py, ...); report/sections.py annotates every
section with the one it reads. These tests fail when

- report/sections.py reads a key its annotation does not declare (read with `[]`: a key
  every run writes; with `.get` or `in`: any declared key), found in its source;
- a real run's summary lacks a declared key, or holds one the contract does not name
  (every step of `vislens study` on the toy, at the smallest scale);
- the report or the study's headline (experiments/study.py `_headline`) reads, on those
  real summaries, a key the contract does not declare.

A new key: declare it in the experiment's TypedDict (required when every run writes it).
"""

from __future__ import annotations

import ast
import json
import types
import typing
from pathlib import Path

import pytest

from vislens.experiments.ablation import AblationSummary
from vislens.experiments.accuracy import AccuracySummary
from vislens.experiments.attention import AttentionSummary
from vislens.experiments.knockout import KnockoutSummary
from vislens.experiments.logit_lens import LensSummary
from vislens.experiments.patching import Curve, PatchSummary, TokenLayer
from vislens.experiments.perception.artifacts import (
    ArtifactsSummary,
    HeldOutChange,
    HeldOutTask,
)
from vislens.experiments.perception.perceive import PerceiveSummary, TaskEntry
from vislens.experiments.perception.prefix import PrefixSummary
from vislens.experiments.perception.surface import SurfaceSummary
from vislens.report import sections

SECTIONS_PY = Path(sections.__file__)
CONTRACTS = {t.__name__: t for t in (
    AccuracySummary, AblationSummary, LensSummary, KnockoutSummary, AttentionSummary,
    PerceiveSummary, ArtifactsSummary, PrefixSummary, SurfaceSummary, TaskEntry, HeldOutTask,
    HeldOutChange, PatchSummary, Curve, TokenLayer)}
# study step -> (where its summary lies under the study directory, contract, section)
STEPS = {
    "accuracy": ("accuracy.json", AccuracySummary, sections.accuracy_section),
    "ablation": ("ablate/summary.json", AblationSummary, sections.ablation_section),
    "logit lens": ("logit-lens/summary.json", LensSummary, sections.logit_lens_section),
    "knockout": ("knockout/summary.json", KnockoutSummary, sections.knockout_section),
    "patch": ("patch/summary.json", PatchSummary, sections.patch_section),
    "attention": ("attention/summary.json", AttentionSummary, sections.attention_section),
    "perceive": ("perceive/summary.json", PerceiveSummary, sections.perceive_section),
    "artifacts": ("artifacts/summary.json", ArtifactsSummary, sections.artifacts_section),
    "prefix": ("prefix/summary.json", PrefixSummary, sections.prefix_section),
    "surface": ("surface/summary.json", SurfaceSummary, sections.surface_section),
}


# ---- types ---------------------------------------------------------------------------------
def _hints(td) -> dict:
    return typing.get_type_hints(td)


def _strip_none(tp):
    """X for `X | None`; tp otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _keys(td) -> frozenset:
    return td.__required_keys__ | td.__optional_keys__


def problems(value, tp, where: str) -> list[str]:
    """Where `value` breaks the contract `tp`: a TypedDict's required key missing or a key
    it does not declare, at every level the contract types (nested TypedDicts, dicts and
    lists of them)."""
    tp = _strip_none(tp)
    if value is None:
        return []
    if typing.is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not a {tp.__name__}"]
        out = [f"{where} lacks {k!r}, which {tp.__name__} requires"
               for k in sorted(tp.__required_keys__ - value.keys())]
        out += [f"{where} holds {k!r}, which {tp.__name__} does not declare"
                for k in sorted(value.keys() - _keys(tp))]
        hints = _hints(tp)
        for k in sorted(value.keys() & hints.keys()):
            out += problems(value[k], hints[k], f"{where}[{k!r}]")
        return out
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and isinstance(value, dict):
        return [p for k, v in value.items() for p in problems(v, args[1], f"{where}[{k!r}]")]
    if origin is list and isinstance(value, list):
        return [p for i, v in enumerate(value) for p in problems(v, args[0], f"{where}[{i}]")]
    return []


# ---- what report/sections.py reads, from its source ----------------------------------------
def _contract_names(annotation: ast.expr | None) -> list[str]:
    """The contracts an annotation names at its top level (`A`, `A | B`, `A | dict`)."""
    if isinstance(annotation, ast.Name):
        return [annotation.id] if annotation.id in CONTRACTS else []
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _contract_names(annotation.left) + _contract_names(annotation.right)
    return []


def _key(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _contracts_of(node: ast.expr, typed: dict[str, list]) -> list:
    """The contracts an expression's value is declared as (`typed`: variable -> contracts)."""
    if isinstance(node, ast.Name):
        return typed.get(node.id, [])
    base, key = None, None
    if isinstance(node, ast.Subscript):
        base, key = node.value, _key(node.slice)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "get" and node.args):
        base, key = node.func.value, _key(node.args[0])
    if base is None or key is None:
        return []
    inner = [_strip_none(_hints(td).get(key)) for td in _contracts_of(base, typed)]
    return [t for t in inner if typing.is_typeddict(t)]


def source_reads() -> list[tuple[str, int, list, str, str]]:
    """(function, line, contracts, key, how) for every constant key read in sections.py
    from a parameter or variable annotated with a contract, or from a key of one that the
    contract types as another (`summary["perceive"].get("headline")`)."""
    tree = ast.parse(SECTIONS_PY.read_text())
    reads = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        typed: dict[str, list] = {}
        for arg in fn.args.args + fn.args.kwonlyargs:
            typed[arg.arg] = [CONTRACTS[n] for n in _contract_names(arg.annotation)]
        for node in ast.walk(fn):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                typed[node.target.id] = [CONTRACTS[n] for n in _contract_names(node.annotation)]

        for node in ast.walk(fn):
            if isinstance(node, ast.Subscript) and _key(node.slice):
                base, key, how = node.value, _key(node.slice), "[]"
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "get" and node.args and _key(node.args[0])):
                base, key, how = node.func.value, _key(node.args[0]), "get"
            elif (isinstance(node, ast.Compare) and len(node.ops) == 1
                  and isinstance(node.ops[0], ast.In) and _key(node.left)):
                base, key, how = node.comparators[0], _key(node.left), "in"
            else:
                continue
            tds = _contracts_of(base, typed)
            if tds:
                reads.append((fn.name, node.lineno, tds, key, how))
    return reads


def test_every_section_reads_a_summary_contract():
    """Each section function takes the TypedDict of the summary it shows."""
    tree = ast.parse(SECTIONS_PY.read_text())
    untyped = [fn.name for fn in tree.body if isinstance(fn, ast.FunctionDef)
               and fn.name.endswith("_section") and fn.name != "timing_section"
               and not _contract_names(fn.args.args[0].annotation)]
    assert not untyped, f"report/sections.py: {untyped} take no summary contract"
    assert {s.__name__ for _, _, s in STEPS.values()} == {
        fn.name for fn in tree.body if isinstance(fn, ast.FunctionDef)
        and fn.name.endswith("_section") and fn.name != "timing_section"}


def test_the_report_reads_only_declared_keys():
    reads = source_reads()
    assert len(reads) > 50  # the scan sees the sections' reads
    wrong = []
    for fn, line, tds, key, how in reads:
        for td in tds:
            allowed = td.__required_keys__ if how == "[]" else _keys(td)
            if key not in allowed:
                kind = "a key every run writes" if how == "[]" else "a declared key"
                wrong.append(f"sections.py:{line} {fn} reads {key!r} ({how}) of {td.__name__}, "
                             f"not {kind}")
    assert not wrong, "\n".join(wrong)


# ---- real summaries -----------------------------------------------------------------------
class Reads(dict):
    """A summary that notes every key asked of it: (contract, key, how)."""

    def __init__(self, data: dict, td, log: list):
        super().__init__(data)
        self._td, self._log, self._types = td, log, _hints(td)

    def _child(self, key, value):
        return wrap(value, self._types.get(key), self._log)

    def __getitem__(self, key):
        self._log.append((self._td, key, "[]"))
        return self._child(key, super().__getitem__(key))

    def get(self, key, default=None):
        self._log.append((self._td, key, "get"))
        return self._child(key, super().__getitem__(key)) if super().__contains__(key) \
            else default

    def __contains__(self, key):
        self._log.append((self._td, key, "in"))
        return super().__contains__(key)


def wrap(value, tp, log: list):
    """`value` with every level the contract `tp` types as a TypedDict noting its reads."""
    tp = _strip_none(tp)
    if value is None or tp is None:
        return value
    if typing.is_typeddict(tp) and isinstance(value, dict):
        return Reads(value, tp, log)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and isinstance(value, dict):
        return {k: wrap(v, args[1], log) for k, v in value.items()}
    if origin is list and isinstance(value, list):
        return [wrap(v, args[0], log) for v in value]
    return value


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Every step of `vislens study` on the toy at the smallest scale (~20 s on 2 cores):
    (the study's result, step -> its summary as written to disk)."""
    from vislens.experiments.study import StudyConfig, run_study

    out = tmp_path_factory.mktemp("study")
    result = run_study(StudyConfig(scale=0.01), out, log=lambda _: None)
    summaries = {}
    for step, (where, _, _) in STEPS.items():
        data = json.loads((out / where).read_text())
        summaries[step] = data["result"] if step == "accuracy" else data
    return result, summaries


@pytest.mark.slow
def test_every_study_step_has_a_contract(study):
    result, _ = study
    assert set(result.summaries) == set(STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("step", list(STEPS))
def test_real_summary_keeps_its_contract(study, step):
    _, summaries = study
    found = problems(summaries[step], STEPS[step][1], step)
    assert not found, "\n".join(found)


@pytest.mark.slow
@pytest.mark.parametrize("step", list(STEPS))
def test_report_and_headline_read_declared_keys(study, step):
    from vislens.experiments.study import _headline

    _, summaries = study
    _, td, section = STEPS[step]
    log: list = []
    section(wrap(summaries[step], td, log))
    _headline(step, wrap(summaries[step], td, log))
    assert any(t is td for t, _, _ in log)  # the wrapper saw the reads
    wrong = sorted({f"{t.__name__}[{key!r}] ({how})" for t, key, how in log
                    if key not in (t.__required_keys__ if how == "[]" else _keys(t))})
    assert not wrong, f"{step}: read but not declared (or read with [] but optional): {wrong}"
