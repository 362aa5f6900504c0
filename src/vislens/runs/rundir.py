"""Result directories: config.json, rows.parquet, summary.json, written so a
crash never leaves half a file and a rerun of the same command resumes.

Rows go to numbered parquet parts (one per flush); a part is written to a
temporary name and renamed, so a part either exists whole or not at all. A
rerun reads the keys already present and skips them. Rows come as dicts
(`add`) or, for experiments with many numbers per key, as columnar tables
(`add_table`); `tables` reads the parts back one at a time and only the
columns asked for, so a summary can be computed in memory that does not grow
with the number of rows.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vislens.errors import VislensError


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class RunDir:
    """One experiment's output directory.

    `config` must hold everything that changes results; a rerun with a
    different config in the same directory is refused instead of mixing rows.
    """

    def __init__(self, out: str | Path, config: dict[str, Any], key: Iterable[str]):
        self.path = Path(out)
        self.key = tuple(key)
        self.config = config
        if self.path.exists() and not self.path.is_dir():
            raise VislensError(f"{self.path} is a file; pass a directory as --out")
        cfg_path = self.path / "config.json"
        self._written = cfg_path.exists()
        if self._written:
            old = json.loads(cfg_path.read_text())
            if _comparable(old) != _comparable(json.loads(json.dumps(config, default=_jsonable))):
                raise VislensError(
                    f"{self.path} holds a run with a different configuration; "
                    "pass a new --out directory (or delete the old one) to start afresh"
                )
        self._pending: list[dict[str, Any]] = []
        self._pending_tables: list[pa.Table] = []
        self._done = self._load_keys()
        self._index: int | None = None  # part number of the next flush (flush_as)

    def ensure(self) -> Path:
        """Create the directory and its config.json when the first result is written, so a
        run that fails before that (bad option, no data) leaves nothing behind."""
        if not self._written:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / "config.json", self.config)
            self._written = True
        return self.path

    @property
    def rows_dir(self) -> Path:
        return self.path / "rows.parquet"

    def _parts(self) -> list[Path]:
        if not self.rows_dir.exists():
            return []
        return sorted(self.rows_dir.glob("part-*.parquet"))

    def _load_keys(self) -> set[tuple]:
        done: set[tuple] = set()
        for part in self._parts():
            done.update(_key_tuples(pq.read_table(part, columns=list(self.key)), self.key))
        return done

    def reload(self) -> None:
        """Reread the keys on disk: other processes (Ray workers) write parts here too."""
        self.flush()
        self._done = self._load_keys()

    def next_index(self) -> int:
        """One past the highest part number on disk. Not the count: a sharded run numbers
        its parts by unit and can leave gaps (vislens.runs.ray_pool)."""
        numbers = [int(m.group(1)) for p in self._parts()
                   if (m := re.match(r"part-(\d+)", p.name))]
        return max(numbers, default=-1) + 1

    def done(self, **key: Any) -> bool:
        return tuple(key[k] for k in self.key) in self._done

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        self._done.add(tuple(row[k] for k in self.key))

    def add_table(self, table: pa.Table) -> None:
        """Rows as one columnar table (written by the next flush, like `add`'s rows).

        Array columns (top-k over layers, ...) stay numpy-backed from the experiment
        to the file: no Python object is made per number.
        """
        self._pending_tables.append(table)
        self._done.update(_key_tuples(table.select(list(self.key)), self.key))

    def flush(self) -> None:
        if not self._pending and not self._pending_tables:
            return
        self.ensure()
        self.rows_dir.mkdir(exist_ok=True)
        index = self.next_index() if self._index is None else self._index
        final = self.rows_dir / f"part-{index:05d}.parquet"
        tmp = self.rows_dir / f".part-{index:05d}.parquet.tmp"
        tables = list(self._pending_tables)
        if self._pending:
            tables.append(pa.Table.from_pylist(self._pending))
        pq.write_table(pa.concat_tables(tables, promote_options="default"), tmp)
        os.replace(tmp, final)
        self._pending, self._pending_tables = [], []

    def flush_as(self, index: int) -> None:
        """Flush into part number `index`, replacing a part of that number: a sharded run's
        unit always writes the same part, so a unit redone after its worker died cannot
        leave its rows twice."""
        self._index = index
        try:
            self.flush()
        finally:
            self._index = None

    def rows(self) -> list[dict[str, Any]]:
        self.flush()
        out: list[dict[str, Any]] = []
        for part in self._parts():
            out.extend(pq.read_table(part).to_pylist())
        return out

    def tables(self, columns: Iterable[str] | None = None) -> Iterator[pa.Table]:
        """Each part as a table of `columns` only (all when None), one part at a time."""
        self.flush()
        columns = None if columns is None else list(columns)
        for part in self._parts():
            yield pq.read_table(part, columns=columns)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        self.flush()
        self.ensure()
        path = self.path / "summary.json"
        write_json_atomic(path, summary)
        return path


def _key_tuples(table: pa.Table, key: tuple[str, ...]) -> set[tuple]:
    """The distinct key tuples of a table, deduplicated by arrow before any Python object
    is made (a columnar part holds many rows per key)."""
    if table.num_rows == 0:
        return set()
    distinct = table.group_by(list(key)).aggregate([])
    return set(zip(*(distinct.column(k).to_pylist() for k in key), strict=True))


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """Fields that do not change results (where output goes, batch size) do not block a resume."""
    ignored = {"out", "batch_size", "device", "progress"}
    return {k: v for k, v in config.items() if k not in ignored}
