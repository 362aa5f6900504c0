"""Export activations of image tokens (and optionally the prompt's other tokens) per layer,
for training probes and sparse autoencoders outside vislens.

The format and its reader are vislens.data.activations. Here: the run that writes it.

Images are cut into shards of `shard_size` in data order; a shard is one unit of the
executor (this process or a Ray worker: vislens.runs), so a sharded run writes the
single-process run's files. A unit captures its images a batch at a time into a
ShardWriter, writes the shard (temporary name, then renamed: a shard either exists whole
or not at all), then its index rows as one RunDir part. The part is what marks the
images done: a rerun after an interrupt redoes only shards without a part, and a shard
rewritten there is the same file (its name is its number in data order, its content the
same tensors). Memory is then one shard's tensors plus one batch's forward pass, however
many images are exported; what a shard holds is
shard_size x tokens x (layers x sources) x width x bytes per number.

Vectors are stored as capture (vislens.interventions.capture) gathers them, in the
model's dtype: residual l is the input of decoder layer l (0 = the LM's input embeddings,
num_layers = the last layer's output before the final norm); keys (post-RoPE, as
attention sees them), keys-pre (before RoPE) and values of decoder layer l, [kv_heads,
head_dim] per token. A token's object is the data's instance covering most of its pixel
box (ImageTokenMap.coverage: a pixel is a box's when its centre is), none when no
instance touches it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from vislens.data.activations import (
    FORMAT,
    INDEX_COLUMNS,
    SHARDS,
    SOURCES,
    shard_name,
    tensor_name,
)
from vislens.data.samples import Sample
from vislens.errors import VislensError
from vislens.interventions import capture
from vislens.runs.local import executor
from vislens.runs.rundir import RunDir

PROMPT = "describe this image ."
CAPTURED = {"residual": "residual", "keys": "keys_post", "keys-pre": "keys_pre",
            "values": "values"}  # source -> capture's table
SUMMARY_COLUMNS = ("sample", "kind", "object", "layer", "source", "shard")


@dataclass
class CaptureConfig:
    layers: tuple[int, ...] | None = None  # None: every layer (residual: 0..num_layers)
    sources: tuple[str, ...] = ("residual",)
    text: bool = False  # also the prompt's other tokens (chat template, text, image markers)
    shard_size: int = 32  # images per shard
    batch_size: int = 4  # images per forward pass
    prompt: str = PROMPT

    def validate(self) -> None:
        """What can be checked before the model is loaded (its depth is checked by
        `resolved`)."""
        if not self.sources:
            raise VislensError(f"--sources is empty; give some of {', '.join(SOURCES)}")
        for source in self.sources:
            if source not in SOURCES:
                raise VislensError(f"unknown source {source!r}; choose from "
                                   f"{', '.join(SOURCES)}")
        if len(set(self.sources)) != len(self.sources):
            raise VislensError(f"--sources names a source twice: {','.join(self.sources)}")
        if self.layers is not None:
            if not self.layers:
                raise VislensError("--layers is empty; give e.g. all, 3 or 0,2,4-6")
            if min(self.layers) < 0:
                raise VislensError(f"--layers {min(self.layers)}: layers count from 0")
        for name, value in (("--shard-size", self.shard_size), ("--batch-size",
                                                                self.batch_size)):
            if value < 1:
                raise VislensError(f"{name} must be at least 1 (got {value})")

    def resolved(self, num_layers: int) -> CaptureConfig:
        """This config with its layers spelled out and checked against the model's depth."""
        self.validate()
        top = num_layers if "residual" in self.sources else num_layers - 1
        layers = tuple(range(top + 1)) if self.layers is None else \
            tuple(sorted(set(int(x) for x in self.layers)))
        if max(layers) > num_layers:
            raise VislensError(
                f"--layers {max(layers)} is out of range: the model has {num_layers} layers "
                f"(residual 0-{num_layers}, keys / values 0-{num_layers - 1})")
        if num_layers in layers and "residual" not in self.sources:
            raise VislensError(
                f"--layers {num_layers}: {', '.join(self.sources)} exist for layers "
                f"0-{num_layers - 1} (layer {num_layers} is the last layer's output, a "
                "residual only); drop it or add --sources residual")
        return replace(self, layers=layers, sources=tuple(self.sources))

    def pairs(self, num_layers: int) -> list[tuple[int, str]]:
        """(layer, source) of every stored tensor, layer-major: residual has one state more
        than keys / values (num_layers, the last layer's output)."""
        return [(layer, source) for layer in self.layers for source in self.sources
                if source == "residual" or layer < num_layers]


def parse_layers(text: str) -> tuple[int, ...] | None:
    """--layers: all (None), or a comma list of layers and A-B ranges ("0,2,4-6")."""
    text = text.strip().lower()
    if text in ("", "all"):
        return None
    layers: list[int] = []
    try:
        for item in (t.strip() for t in text.split(",")):
            lo, sep, hi = item.partition("-")
            layers.extend(range(int(lo), int(hi) + 1) if sep else [int(item)])
    except ValueError:
        raise VislensError(f"--layers must be all or a list like 0,2,4-6 (got {text!r})") \
            from None
    return tuple(layers)


def execute(vlm, samples: list[Sample], config: CaptureConfig, out: Path, meta: dict,
            progress=None) -> CaptureSummary:
    """Export into directory `out` (resuming), and write summary.json."""
    depth = executor(vlm).info.num_layers
    config = config.resolved(depth)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    # every stored tensor's name: the loader tells a layer a source lacks from one not asked
    tensors = [tensor_name(source, layer)
               for layer, source in config.pairs(depth)]
    run_dir = RunDir(out, {"experiment": "capture", "format": FORMAT, **meta, **cfg,
                           "tensors": tensors}, key=["sample"])
    summary = run(vlm, samples, config, run_dir, progress)
    run_dir.write_summary(summary)
    return summary


def run(vlm, samples: list[Sample], config: CaptureConfig, out: RunDir, progress=None
        ) -> CaptureSummary:
    if not samples:
        raise VislensError("no samples to capture; check --data / --n")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise VislensError("the data holds two samples with one id; the index could not tell "
                           "them apart")
    ex = executor(vlm)  # this process, or a vislens.runs.ray_pool.RayPool: one unit per shard
    config = config.resolved(ex.info.num_layers)
    size = config.shard_size
    units = [(i // size, samples[i:i + size]) for i in range(0, len(samples), size)]
    todo = [u for u in units if not all(out.done(sample=s.id) for s in u[1])]
    ex.map(_shard, todo, config, out=out, progress=progress, label="capture")
    for stale in (out.path / SHARDS).glob(".shard-*.tmp"):  # a write cut off by a kill
        stale.unlink(missing_ok=True)
    return summarise(out.tables(SUMMARY_COLUMNS), ex.info, config, out.path)


class ShardWriter:
    """One shard's tensors, added a batch at a time and written once.

    `held_bytes` is what it holds now, `peak_bytes` the most it ever held: the run's
    memory bound is one shard, and the tests read this counter to see that it holds.
    """

    def __init__(self):
        self.pieces: dict[str, list[torch.Tensor]] = {}
        self.rows = 0
        self.held_bytes = 0
        self.peak_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """The same rows (tokens) of every stored tensor, appended after those held."""
        counts = {len(t) for t in tensors.values()}
        if len(counts) != 1:
            raise ValueError(f"tensors of one batch disagree on their rows: {sorted(counts)}")
        for name, x in tensors.items():
            x = x.detach().to("cpu").contiguous()
            self.pieces.setdefault(name, []).append(x)
            self.held_bytes += x.nbytes
        self.rows += counts.pop()
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def write(self, path: Path, metadata: dict[str, str]) -> int:
        """Write the shard at `path` (a temporary name, then renamed) and let go of its
        tensors; returns the bytes of tensor data written."""
        from safetensors.torch import save_file

        tensors = {}
        for name in list(self.pieces):  # joined one name at a time: its pieces go as it does
            parts = self.pieces.pop(name)
            tensors[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
            del parts
        nbytes = sum(t.nbytes for t in tensors.values())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        self.held_bytes = 0
        return nbytes


@torch.no_grad()
def _shard(vlm, out: RunDir, unit, config: CaptureConfig) -> None:
    """Capture one shard's images, write the shard, then its index rows (one part)."""
    number, samples = unit
    pairs = config.pairs(vlm.num_layers)
    writer = ShardWriter()
    tokens: list[pa.Table] = []
    for start in range(0, len(samples), config.batch_size):
        chunk = samples[start:start + config.batch_size]
        batch = vlm.prepare([s.image for s in chunk], [config.prompt] * len(chunk))
        columns = [_columns(batch, b, config.text) for b in range(len(chunk))]
        with _capture(vlm, [pos for pos, _ in columns], config) as cap:
            vlm.forward(batch, logits_to_keep=1)
        first = writer.rows
        writer.add({tensor_name(source, layer): getattr(cap, CAPTURED[source])[layer]
                    for layer, source in pairs})
        tokens.append(_token_rows(batch, chunk, columns, first))
        del cap, batch
    path = out.ensure() / shard_name(number)
    # one metadata key: safetensors writes its metadata map in no fixed order, and a shard
    # rewritten on resume must be the same bytes
    writer.write(path, {"vislens": json.dumps({"format": FORMAT,
                                               "samples": [s.id for s in samples]})})
    out.add_table(_index(pa.concat_tables(tokens), pairs, shard_name(number)))


def _capture(vlm, positions, config: CaptureConfig):
    """capture() of exactly the sources asked for: residual[num_layers] needs the last
    layer among capture's layers."""
    top = vlm.num_layers
    layers = {layer for layer in config.layers if layer < top}
    if top in config.layers:
        layers.add(top - 1)
    post, pre = "keys" in config.sources, "keys-pre" in config.sources
    keys = (post and pre) or ("post" if post else "pre" if pre else False)
    return capture(vlm, positions, layers=sorted(layers),
                   residual="residual" in config.sources, keys=keys,
                   values="values" in config.sources)


def _columns(batch, b: int, text: bool) -> tuple[np.ndarray, np.ndarray]:
    """(columns, kind of each) of sample b: its image patch tokens, and with `text` every
    other token of its (unpadded) sequence, in sequence order."""
    tm = batch.token_map
    image = np.asarray(tm.image_positions(b), dtype=np.int64)
    if not text:
        return image, np.full(len(image), "image", dtype=object)
    cols = np.flatnonzero(batch.attention_mask[b].cpu().numpy() > 0).astype(np.int64)
    kind = np.full(len(cols), "text", dtype=object)
    kind[np.isin(cols, tm.marker_positions(b))] = "marker"
    kind[np.isin(cols, tm.newline_positions(b))] = "newline"
    kind[np.isin(cols, image)] = "image"
    return cols, kind


def _token_rows(batch, samples: list[Sample], columns, first_row: int) -> pa.Table:
    """A row per captured token of the batch, in capture's row order (sample, then column)."""
    tm = batch.token_map
    parts = []
    row = first_row
    for b, (sample, (cols, kind)) in enumerate(zip(samples, columns)):
        n = len(cols)
        rows = tm._rows(b)
        lookup = {int(p): i for i, p in enumerate(tm.position[rows])}
        at = np.array([lookup.get(int(c), -1) for c in cols], dtype=np.int64)
        patch = at >= 0
        picked = rows[at[patch]]
        ints = {k: np.full(n, -1, dtype=np.int32) for k in ("image", "tile", "row", "col")}
        for k, src in (("image", tm.image), ("tile", tm.tile), ("row", tm.row),
                       ("col", tm.col)):
            ints[k][patch] = src[picked]
        box = np.full((n, 4), np.nan)
        obj = np.full(n, -1, dtype=np.int32)
        cover = np.full(n, np.nan)
        if tm.geometric:
            box[patch] = tm.box[picked]
            obj, cover = _objects(tm, b, sample, cols, patch & (ints["image"] == 0), obj, cover)
        names = [inst.name for inst in sample.instances]
        valid = np.flatnonzero(batch.attention_mask[b].cpu().numpy() > 0)
        ids = batch.input_ids[b].cpu().numpy()
        parts.append(pa.table({
            "sample": pa.array([sample.id] * n, pa.string()),
            "kind": pa.array(kind.tolist(), pa.string()),
            "position": pa.array((cols - valid[0]).astype(np.int32)),
            "token_id": pa.array(ids[cols].astype(np.int64)),
            **{k: pa.array(v) for k, v in ints.items()},
            **{k: pa.array(box[:, i]) for i, k in enumerate(("x0", "y0", "x1", "y1"))},
            "object": pa.array(obj),
            "object_class": pa.array([names[o] if o >= 0 else None for o in obj], pa.string()),
            "object_coverage": pa.array(cover),
            "shard_row": pa.array(np.arange(row, row + n, dtype=np.int64)),
        }))
        row += n
    return pa.concat_tables(parts)


def _objects(tm, b: int, sample: Sample, cols: np.ndarray, on_image: np.ndarray,
             obj: np.ndarray, cover: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token of the sample's (first) image: the instance covering most of its box (the
    first on ties) and that share; -1 and 0 where no instance touches it."""
    cover = cover.copy()
    cover[on_image] = 0.0
    if not sample.instances or not on_image.any():
        return obj, cover
    shares = []
    for inst in sample.instances:
        pos, frac = tm.coverage(b, inst.mask)
        order = dict(zip(pos.tolist(), frac.tolist()))
        shares.append([order[int(c)] for c in cols[on_image]])
    shares = np.asarray(shares)  # [instances, tokens]
    best = shares.argmax(0)
    most = shares.max(0)
    obj = obj.copy()
    obj[on_image] = np.where(most > 0, best, -1)
    cover[on_image] = most
    return obj, cover


def _index(tokens: pa.Table, pairs: list[tuple[int, str]], shard: str) -> pa.Table:
    """The shard's index: its token rows once per stored (layer, source), layer-major."""
    n = tokens.num_rows
    blocks = [tokens.append_column("layer", pa.array(np.full(n, layer, dtype=np.int32)))
              .append_column("source", pa.array([source] * n, pa.string()))
              .append_column("shard", pa.array([shard] * n, pa.string()))
              for layer, source in pairs]
    return pa.concat_tables(blocks).select(list(INDEX_COLUMNS))


class CaptureSummary(TypedDict):
    """summary.json of `vislens capture` (what `execute` returns and --json prints), declared
    as main's other experiments declare theirs; tests/test_capture_export.py checks a real
    summary against these keys."""

    model: str
    n_layers: int  # decoder layers of the model (residual has one state more)
    n_images: int
    n_tokens: dict[str, int]  # per kind (image, newline, marker, text), each stored once
    n_object_tokens: int  # image tokens with an instance under them
    n_background_tokens: int  # image tokens no instance touches
    n_rows: int  # index rows: tokens x stored (layer, source) pairs
    layers: list[int]
    sources: list[str]
    dtype: str | None  # as stored, e.g. "bfloat16"
    shapes: dict[str, list[int]]  # per source, one token's vector
    n_shards: int
    bytes: int  # of the shard files
    out: str
    load: str  # the Python call that reads the first stored tensor back
    config: dict[str, Any]


def summarise(tables, vlm, config: CaptureConfig, root: Path) -> CaptureSummary:
    """Counts of what the export holds, from its index parts (read one at a time), and the
    stored dtype and shapes, from a shard's header."""
    from safetensors import safe_open

    layer, source = config.pairs(vlm.num_layers)[0]
    samples: set[str] = set()
    shards: set[str] = set()
    kinds: dict[str, int] = {}
    n_rows = n_object = n_background = 0
    for table in tables:
        n_rows += table.num_rows
        samples.update(pc.unique(table.column("sample")).to_pylist())
        shards.update(pc.unique(table.column("shard")).to_pylist())
        one = table.filter(pc.and_(pc.equal(table.column("layer"), layer),
                                   pc.equal(table.column("source"), source)))
        for kind, count in zip(*np.unique(one.column("kind").to_numpy(zero_copy_only=False),
                                          return_counts=True)):
            kinds[str(kind)] = kinds.get(str(kind), 0) + int(count)
        image = one.filter(pc.equal(one.column("kind"), "image"))
        on = image.column("object").to_numpy() >= 0
        n_object += int(on.sum())
        n_background += int((~on).sum())
    shapes, dtype = {}, None
    if shards:
        with safe_open(str(root / min(shards)), framework="pt") as f:
            for s in config.sources:
                at = next(lay for lay, src in config.pairs(vlm.num_layers) if src == s)
                empty = f.get_slice(tensor_name(s, at))[0:0]
                shapes[s], dtype = list(empty.shape[1:]), str(empty.dtype).replace("torch.", "")
    return {
        "model": getattr(vlm, "name", ""),
        "n_layers": vlm.num_layers,
        "n_images": len(samples),
        "n_tokens": kinds,  # per kind, each stored once per (layer, source)
        "n_object_tokens": n_object,  # image tokens with an instance under them
        "n_background_tokens": n_background,
        "n_rows": n_rows,  # index rows: tokens x (layer, source) pairs
        "layers": list(config.layers),
        "sources": list(config.sources),
        "dtype": dtype,
        "shapes": shapes,  # per source, the shape of one token's vector
        "n_shards": len(shards),
        "bytes": sum((root / s).stat().st_size for s in shards),
        "out": str(root),
        "load": f"vislens.data.activations.load_activations({str(root)!r}, layer={layer}, "
                f"source={source!r})",
        "config": asdict(config),
    }
