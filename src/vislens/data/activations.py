"""Activations exported by `vislens capture`, read back for probes and sparse autoencoders.

A capture directory holds:

- `shards/shard-NNNNN.safetensors`: one file per shard of K images (`--shard-size`), with a
  tensor per (source, layer) named "residual/3", "keys/3", "values/3": row r of every tensor
  in a shard is the same token. Tensors keep the model's dtype (bf16 stays bf16) and the
  capture's shape: residual [rows, hidden], keys / values [rows, kv_heads, head_dim].
- `rows.parquet/part-NNNNN.parquet`: the index, one row per (token, layer, source) (the
  columns: INDEX_COLUMNS), saying where its vector is (`shard`, `shard_row`).
- `config.json`, `summary.json`: what was captured, as every run directory.

The index is read with pyarrow and the tensors with safetensors' lazy reader, so
`load_activations` reads only the one tensor of each shard it is asked for, and
`ActivationDataset` holds one shard's tensor at a time however many images were exported.
Nothing here imports a model, so a probe or SAE trainer needs only this module; it lives
with the data sets because an export is one, read as they are, below every experiment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from vislens.errors import VislensError

FORMAT = "vislens-activations/1"
SOURCES = ("residual", "keys", "keys-pre", "values")  # keys: post-RoPE, as attention sees them
# a token's kind: an image patch, an image's newline or marker token (inside its block, not a
# patch), or any other token of the prompt (chat template and text)
KINDS = ("image", "newline", "marker", "text")
SHARDS = "shards"
INDEX = "rows.parquet"
INDEX_COLUMNS = (
    "sample", "kind", "position", "token_id", "image", "tile", "row", "col",
    "x0", "y0", "x1", "y1", "object", "object_class", "object_coverage",
    "layer", "source", "shard", "shard_row",
)
VECTOR = "activation"  # the dataset's name for a row's vector


def shard_name(number: int) -> str:
    """A shard's path inside the run directory (the index's `shard` column)."""
    return f"{SHARDS}/shard-{number:05d}.safetensors"


def tensor_name(source: str, layer: int) -> str:
    return f"{source}/{int(layer)}"


def read_index(path: str | Path, layer: int | None = None, source: str | None = None,
               kind: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Index rows of a layer, source and kind (None: every one), ordered by layer, source,
    shard and row; one parquet part is read at a time, with the filter pushed down."""
    root = _run_dir(path)
    _check(root, layer, source, kind)
    filters = _filters(layer, source, kind)
    tables = [_read_part(part, filters, columns) for part in _parts(root)]
    table = pa.concat_tables(tables)
    order = [k for k in ("layer", "source", "shard", "shard_row") if k in table.column_names]
    return table.sort_by([(k, "ascending") for k in order])


def _filters(layer: int | None, source: str | None, kind: str | None) -> list | None:
    found = [(name, "=", value) for name, value in
             (("layer", layer), ("source", source), ("kind", kind)) if value is not None]
    return found or None


def _read_part(part: Path, filters: list | None, columns: Sequence[str] | None) -> pa.Table:
    """One part's rows that pass `filters`, ordered by shard and row."""
    wanted = None if columns is None else list(dict.fromkeys([*columns, "shard", "shard_row"]))
    table = pq.read_table(part, columns=wanted, filters=filters)
    return table.sort_by([("shard", "ascending"), ("shard_row", "ascending")])


def _parts(root: Path) -> list[Path]:
    parts = sorted((root / INDEX).glob("part-*.parquet"))
    if not parts:
        raise VislensError(f"{root} holds no exported rows yet; run (or rerun, to resume) "
                           f"vislens capture --out {root}")
    return parts


def load_activations(path: str | Path, layer: int, source: str = "residual",
                     kind: str | None = None) -> tuple[torch.Tensor, pa.Table]:
    """Every exported vector of one layer and source, and the index row of each.

    Returns (vectors [N, ...] in the stored dtype, index table of N rows: row i of the
    table describes vectors[i]). kind="image" keeps image patch tokens only (the default
    keeps every kind the capture wrote). Memory: the result plus one shard's tensor.
    """
    from safetensors import safe_open

    root = _run_dir(path)
    index = read_index(root, layer, source, kind)
    name = tensor_name(source, layer)
    out: torch.Tensor | None = None
    done = 0
    for shard, rows in _shard_groups(index):
        with safe_open(str(root / shard), framework="pt") as f:
            block = _rows_of(f.get_tensor(name), rows)
        if out is None:
            out = torch.empty((index.num_rows, *block.shape[1:]), dtype=block.dtype)
        out[done:done + len(block)] = block
        done += len(block)
        del block
    if out is None:  # no row of this kind: an empty tensor of the stored shape
        out = _empty(root, name)
    return out, index


class ActivationDataset:
    """One (layer, source) of a capture directory as rows, in the manner of a `datasets`
    Dataset: `len(ds)`, `ds[i]`, `for row in ds` (dicts: the index columns and
    "activation", a tensor), and `ds.iter(batch_size)` (dicts of lists, "activation"
    stacked into one tensor). Rows come in load_activations' order.

    It streams: iteration reads one index part and one shard's tensor at a time (a part
    indexes one shard), so its memory does not grow with the export, index included;
    `ds[i]` reads just that row (safetensors slices the file).
    """

    def __init__(self, path: str | Path, layer: int, source: str = "residual",
                 kind: str | None = None, columns: Sequence[str] | None = None):
        self.path = _run_dir(path)
        _check(self.path, layer, source, kind)
        self.layer, self.source, self.kind = int(layer), source, kind
        self.name = tensor_name(source, layer)
        self._filters = _filters(self.layer, source, kind)
        self._columns = columns
        # (first shard, part, rows) of every part, in shard order: only the shard column
        # is read here, and let go
        found = []
        for part in _parts(self.path):
            shards = _read_part(part, self._filters, ["shard"]).column("shard")
            if len(shards):
                found.append((str(shards[0]), part, len(shards)))
        self._parts = [(part, rows) for _, part, rows in sorted(found)]
        first = _read_part(self._parts[0][0], self._filters, columns) if self._parts else None
        names = first.column_names if first is not None else list(columns or INDEX_COLUMNS)
        self.column_names = [*names, VECTOR]

    def __len__(self) -> int:
        return sum(rows for _, rows in self._parts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from safetensors import safe_open

        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        i %= len(self)
        ends = np.cumsum([rows for _, rows in self._parts])
        at = int(np.searchsorted(ends, i, side="right"))  # the part holding row i
        i -= int(ends[at - 1]) if at else 0
        row = _read_part(self._parts[at][0], self._filters, self._columns).slice(i, 1)
        row = row.to_pylist()[0]
        with safe_open(str(self.path / row["shard"]), framework="pt") as f:
            r = int(row["shard_row"])
            row[VECTOR] = f.get_slice(self.name)[r:r + 1][0]
        return row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for columns, vectors in self._blocks():
            names = list(columns)
            for j, vector in enumerate(vectors):
                yield {**{k: columns[k][j] for k in names}, VECTOR: vector}

    def iter(self, batch_size: int, drop_last_batch: bool = False
             ) -> Iterator[dict[str, Any]]:
        """Batches of `batch_size` rows (across shards): index columns as lists, the
        vectors as one [batch, ...] tensor."""
        if batch_size < 1:
            raise VislensError(f"batch_size must be at least 1 (got {batch_size})")
        names = self.column_names[:-1]
        cols: dict[str, list] = {k: [] for k in names}
        vecs: list[torch.Tensor] = []
        held = 0
        for columns, vectors in self._blocks():
            start = 0
            while start < len(vectors):
                take = min(batch_size - held, len(vectors) - start)
                for k in names:
                    cols[k].extend(columns[k][start:start + take])
                vecs.append(vectors[start:start + take])
                held += take
                start += take
                if held == batch_size:
                    yield {**cols, VECTOR: torch.cat(vecs)}
                    cols, vecs, held = {k: [] for k in names}, [], 0
        if held and not drop_last_batch:
            yield {**cols, VECTOR: torch.cat(vecs)}

    def _blocks(self) -> Iterator[tuple[dict[str, list], torch.Tensor]]:
        """(index columns as lists, vectors) of each shard in turn."""
        from safetensors import safe_open

        for part, _ in self._parts:
            for shard, rows in _shard_groups(_read_part(part, self._filters, self._columns)):
                with safe_open(str(self.path / shard), framework="pt") as f:
                    vectors = _rows_of(f.get_tensor(self.name), rows)
                yield rows.to_pydict(), vectors


def _run_dir(path: str | Path) -> Path:
    root = Path(path)
    if not (root / "config.json").is_file():
        raise VislensError(f"{root} is no capture directory (no config.json); export one with "
                           f"vislens capture --out {root}")
    return root


def _check(root: Path, layer: int | None, source: str | None, kind: str | None) -> None:
    """A layer, source or kind the run never wrote is a one-line error naming what it did."""
    config = json.loads((root / "config.json").read_text())
    if config.get("experiment") != "capture":
        raise VislensError(f"{root} holds a {config.get('experiment')!r} run, not exported "
                           "activations; pass a vislens capture --out directory")
    if source is not None and source not in config["sources"]:
        raise VislensError(f"source {source!r} was not captured in {root}; it has "
                           f"{', '.join(config['sources'])}")
    if layer is not None and int(layer) not in config["layers"]:
        raise VislensError(f"layer {layer} was not captured in {root}; it has layers "
                           f"{', '.join(map(str, config['layers']))}")
    if kind is not None and kind not in KINDS:
        raise VislensError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if layer is not None and source is not None and \
            tensor_name(source, layer) not in config["tensors"]:
        has = [int(t.split("/")[1]) for t in config["tensors"] if t.split("/")[0] == source]
        raise VislensError(f"{source} has no layer {layer} (the residual alone has the last "
                           f"layer's output); {root} holds {source} at layers "
                           f"{', '.join(map(str, has))}")


def _shard_groups(index: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """The index (sorted by shard) cut into each shard's rows."""
    if index.num_rows == 0:
        return
    shards = index.column("shard").to_numpy(zero_copy_only=False)
    cuts = np.flatnonzero(shards[1:] != shards[:-1]) + 1
    for start, stop in zip([0, *cuts], [*cuts, len(shards)]):
        yield str(shards[start]), index.slice(int(start), int(stop - start))


def _rows_of(tensor: torch.Tensor, rows: pa.Table) -> torch.Tensor:
    """The rows of a shard's tensor that the index names (the whole tensor when it names
    every row, in order: no copy)."""
    picked = pc.cast(rows.column("shard_row"), pa.int64()).to_numpy()
    if len(picked) == len(tensor) and np.array_equal(picked, np.arange(len(tensor))):
        return tensor
    return tensor[torch.tensor(picked)]


def _empty(root: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    shards = sorted((root / SHARDS).glob("shard-*.safetensors"))
    if not shards:
        return torch.empty(0)
    with safe_open(str(shards[0]), framework="pt") as f:
        return f.get_slice(name)[0:0]
