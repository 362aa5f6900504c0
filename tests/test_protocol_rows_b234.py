"""docs/protocol-rows/b234.md: the protocol rows of B2/B3/B4 have the table's columns, and
every config default they quote (`ClassName.field = value`) is the code's default."""

import ast
import dataclasses
import re
from pathlib import Path

from vislens.experiments.perception.artifacts import ArtifactsConfig
from vislens.experiments.perception.perceive import PerceiveConfig
from vislens.experiments.perception.prefix import PrefixConfig
from vislens.experiments.perception.surface import SurfaceConfig

ROWS = Path(__file__).resolve().parents[1] / "docs" / "protocol-rows" / "b234.md"
HEADER = ["definition", "paper's text", "Neo's released code (file:line)", "vislens default",
          "vislens option"]
CLASSES = {c.__name__: c for c in (ArtifactsConfig, PerceiveConfig, PrefixConfig,
                                   SurfaceConfig)}
QUOTED = re.compile(r"`([A-Z]\w*)\.(\w+) = ([^`]+)`")


def table() -> list[list[str]]:
    lines = [ln for ln in ROWS.read_text().splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert cells[0] == HEADER and set("".join(cells[1])) <= set("-: ")
    return cells[2:]


def default(cls, name: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_rows_have_the_tables_columns_and_no_neo_code_for_part_b():
    rows = table()
    assert len(rows) >= 15
    for row in rows:
        assert len(row) == len(HEADER), row
        assert row[2] == "—"  # Neo et al.'s released code has no Part B


def test_every_quoted_default_is_the_codes_default():
    quoted = [m for row in table() for m in QUOTED.findall(row[3])]
    assert len(quoted) >= 12
    for cls, name, value in quoted:
        assert cls in CLASSES, cls
        assert default(CLASSES[cls], name) == ast.literal_eval(value), (cls, name, value)
    assert ("PrefixConfig", "prefix", '"classes"') in quoted  # the default is no oracle
