"""docs/protocol-rows/*.md: every default written as `ClassName.field = value` is the code's."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from vislens.experiments import knockout, logit_lens

ROWS = Path(__file__).resolve().parents[1] / "docs" / "protocol-rows" / "lens_knockout.md"
CLASSES = {"LensConfig": logit_lens.LensConfig, "KnockoutConfig": knockout.KnockoutConfig}
HEADER = ["definition", "paper's text", "Neo's released code (file:line)", "vislens default",
          "vislens option"]


def _tables(text: str) -> list[list[list[str]]]:
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if not all(set(c) <= set("-:") for c in "|".join(cells).split("|")):
                rows.append(cells)  # not the |---|---| rule
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def test_rows_have_the_table_columns():
    tables = _tables(ROWS.read_text())
    assert len(tables) == 2
    for rows in tables:
        assert rows[0] == HEADER
        assert all(len(r) == len(HEADER) for r in rows), [r[0] for r in rows
                                                          if len(r) != len(HEADER)]


def test_every_config_default_named_is_the_codes():
    text = "\n".join(line for line in ROWS.read_text().splitlines() if line.startswith("|"))
    found = re.findall(r"`(\w+)\.(\w+) = ([^`]+)`", text)
    assert {c for c, _, _ in found} == set(CLASSES)
    named = set()
    for cls, field, value in found:
        fields = {f.name: f for f in dataclasses.fields(CLASSES[cls])}
        assert field in fields, f"{cls}.{field}"
        default = fields[field].default
        assert ast.literal_eval(value) == default, (cls, field, value, default)
        named.add((cls, field))
    # the protocol's own choices are all there
    for want in [("LensConfig", "top_k"), ("LensConfig", "object_coverage"),
                 ("LensConfig", "area"), ("KnockoutConfig", "windows"),
                 ("KnockoutConfig", "conditions")]:
        assert want in named, want


@pytest.mark.parametrize("bug", ["norms the last state twice", "writes False into the mask"])
def test_released_code_bugs_are_named(bug):
    assert bug in ROWS.read_text()
