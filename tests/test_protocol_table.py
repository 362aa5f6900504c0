"""docs/PROTOCOL.md cannot drift from the code: every default its "vislens default"
column states as `Class.field = value` is that dataclass field's default."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import vislens

TABLE = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
COLUMNS = ["definition", "paper's text", "Neo's released code (file:line)", "vislens default",
           "vislens option"]
CLAIM = re.compile(r"`([A-Z]\w*)\.(\w+) = ([^`]+)`")


def rows() -> list[list[str]]:
    """Every data row of every table in the document, cells stripped."""
    out, header = [], None
    for line in TABLE.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
            assert header == COLUMNS, f"a table in PROTOCOL.md has columns {header}"
        elif not set("".join(cells)) <= set("-: "):
            out.append(cells)
    return out


def config_classes() -> dict[str, type]:
    """Every dataclass defined in vislens, by name (names are unique)."""
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(vislens.__path__, "vislens."):
        if ".toy" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if dataclasses.is_dataclass(obj) and isinstance(obj, type) \
                    and obj.__module__ == module.__name__:
                assert found.get(name, obj) is obj, f"two dataclasses named {name}"
                found[name] = obj
    return found


def default_of(cls: type, field: str):
    f = next((f for f in dataclasses.fields(cls) if f.name == field), None)
    assert f is not None, f"PROTOCOL.md names {cls.__name__}.{field}, which does not exist"
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"{cls.__name__}.{field} has no default"
    return f.default_factory()


def normal(value):
    """Tuples and lists compare equal; so do dict / mapping contents."""
    if isinstance(value, (tuple, list)):
        return [normal(v) for v in value]
    if isinstance(value, dict):
        return {k: normal(v) for k, v in value.items()}
    return value


def test_protocol_table_has_its_columns_and_a_row_per_definition():
    table = rows()
    assert len(table) >= 80
    assert all(len(r) == len(COLUMNS) for r in table), [r[0] for r in table
                                                      if len(r) != len(COLUMNS)]


def test_part_b_rows_name_no_released_code():
    """Neo et al.'s code has no Part B: every row under a B heading says so."""
    text = TABLE.read_text()
    part_b = text[text.index("## B1."):]
    lines = [ln for ln in part_b.splitlines() if ln.startswith("| ") and
             not ln.startswith("| definition")]
    assert lines and all(re.split(r"(?<!\\)\|", ln)[3].strip() == "—" for ln in lines)


def test_every_stated_default_is_the_codes():
    classes = config_classes()
    claims = [m.groups() for r in rows() for m in CLAIM.finditer(r[3])]
    assert len(claims) >= 40, "the table states too few checkable defaults"
    named = {(c, f) for c, f, _ in claims}
    for wanted in [("Selection", "area"), ("Selection", "strict"), ("Selection", "crowd_target"),
                   ("AblationConfig", "ig_steps"), ("AblationConfig", "ig_sign"),
                   ("AblationConfig", "ig_prompt"), ("AblationConfig", "reference"),
                   ("AblationConfig", "random_ks"), ("LensConfig", "top_k"),
                   ("LensConfig", "object_coverage"), ("LensConfig", "area"),
                   ("KnockoutConfig", "windows"), ("KnockoutConfig", "conditions"),
                   ("PerceiveConfig", "seed"), ("PrefixConfig", "prefix"),
                   ("SurfaceConfig", "seed")]:
        assert wanted in named, f"PROTOCOL.md no longer states the default of {wanted}"
    wrong = []
    for cls_name, field, literal in claims:
        assert cls_name in classes, f"PROTOCOL.md names {cls_name}, no vislens dataclass"
        expected = ast.literal_eval(literal.strip())
        actual = default_of(classes[cls_name], field)
        if normal(actual) != normal(expected):
            wrong.append(f"{cls_name}.{field}: table {expected!r}, code {actual!r}")
    assert not wrong, "docs/PROTOCOL.md disagrees with the code:\n" + "\n".join(wrong)


@pytest.mark.parametrize("bug", [
    'encode("Yes")[0]', "norms the last state twice", "writes False into the mask",
    "startswith(generated_answer.lower())", '"yes" in answer_2.lower()', "crop // 24"])
def test_released_code_bugs_are_named(bug):
    assert bug in TABLE.read_text()
