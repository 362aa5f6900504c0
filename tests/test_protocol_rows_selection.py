"""docs/protocol-rows/selection.md: its table has the protocol table's columns, and every
default it writes as `ClassName.field = value` is that dataclass field's default."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from vislens.data import coco
from vislens.experiments import ablation, attention, knockout, logit_lens

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol-rows" / "selection.md"
COLUMNS = ["definition", "paper's text", "Neo's released code (file:line)", "vislens default",
           "vislens option"]
CLASSES = {c.__name__: c for c in (coco.Selection, ablation.AblationConfig,
                                   knockout.KnockoutConfig, logit_lens.LensConfig,
                                   attention.AttentionConfig)}


def _rows() -> list[list[str]]:
    lines = [ln for ln in DOC.read_text().splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]


def _default(cls, name):
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


def test_table_has_the_protocol_columns():
    rows = _rows()
    assert rows[0] == COLUMNS
    assert all(len(r) == len(COLUMNS) for r in rows), [r[0] for r in rows if len(r) != 5]
    assert len(rows) > 10


def test_every_written_default_is_the_codes():
    checked = 0
    for row in _rows()[2:]:
        for cls, name, value in re.findall(r"`(\w+)\.(\w+) = ([^`]+)`", row[3]):
            assert cls in CLASSES, cls
            assert _default(CLASSES[cls], name) == ast.literal_eval(value), (cls, name)
            checked += 1
    assert checked >= 4
