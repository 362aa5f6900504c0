"""`vislens capture`: exported activations are the model's own, where the index says, with
the token map's geometry and the data's objects; a resumed or sharded export writes the
same files; bad input leaves nothing behind; the writer holds one shard at most.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import vislens
from vislens.cli import app
from vislens.data import open_dataset, shapesworld
from vislens.data.activations import ActivationDataset, load_activations, read_index
from vislens.errors import VislensError
from vislens.experiments import capture as cx
from vislens.interventions import capture

META = {"model": "toy"}
runner = CliRunner()
ALL = ("residual", "keys", "keys-pre", "values")
TABLE = {"residual": "residual", "keys": "keys_post", "keys-pre": "keys_pre", "values": "values"}


@pytest.fixture(scope="module")
def toy():
    return vislens.load("toy")


@pytest.fixture(scope="module")
def scenes():
    return open_dataset("shapesworld:1000", n=6)


def export(vlm, samples, out, **options):
    return cx.execute(vlm, samples, cx.CaptureConfig(**options), out, META)


def files(out: Path) -> dict[str, bytes]:
    """Every shard's bytes, by its path in the run directory."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


def index(out: Path) -> pa.Table:
    """The whole index, parts in name order (what a reader concatenates)."""
    parts = sorted((out / "rows.parquet").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def same(a: pa.Table, b: pa.Table) -> bool:
    """Equal row for row, NaN (the boxes of text tokens) equal to NaN."""
    return a.schema == b.schema and json.dumps(a.to_pylist()) == json.dumps(b.to_pylist())


# ---- geometry and objects --------------------------------------------------------------------
def test_the_index_has_the_token_maps_geometry_and_the_object_under_each_token(toy, scenes,
                                                                               tmp_path):
    export(toy, scenes[:4], tmp_path, layers=(2,), batch_size=3, shard_size=3)
    _, rows = load_activations(tmp_path, layer=2, source="residual")
    assert rows.num_rows == 4 * 144
    seen_objects = 0
    for sample in scenes[:4]:
        mine = rows.filter(pa.compute.equal(rows.column("sample"), sample.id)).to_pydict()
        tm = toy.prepare([sample.image], [cx.PROMPT]).token_map
        assert mine["position"] == tm.image_positions(0).tolist()  # no padding alone: col = pos
        assert np.array_equal(np.stack([mine[k] for k in ("x0", "y0", "x1", "y1")], 1), tm.box)
        assert mine["tile"] == tm.tile.tolist() and mine["row"] == tm.row.tolist()
        assert mine["col"] == tm.col.tolist() and set(mine["kind"]) == {"image"}
        # the object under each box, counted here on the masks themselves (pixels whose
        # centre is in the box; the toy's boxes are whole pixels)
        for i, (x0, y0, x1, y1) in enumerate(tm.box.astype(int)):
            counts = [int(inst.mask[y0:y1, x0:x1].sum()) for inst in sample.instances]
            best = int(np.argmax(counts)) if counts and max(counts) > 0 else -1
            assert mine["object"][i] == best
            assert mine["object_class"][i] == (sample.instances[best].name if best >= 0
                                               else None)
            if best >= 0:
                area = (x1 - x0) * (y1 - y0)
                assert mine["object_coverage"][i] == pytest.approx(counts[best] / area)
        assert set(mine["object"]) == {-1, *range(len(sample.instances))}  # each object found
        seen_objects += sum(o >= 0 for o in mine["object"])
    assert 0 < seen_objects < rows.num_rows


# ---- the vectors are the model's ------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stored_vectors_are_a_direct_capture_bit_for_bit(dtype, scenes, tmp_path):
    vlm = vislens.load("toy", dtype=dtype)
    summary = export(vlm, scenes[:3], tmp_path, sources=ALL, text=True, batch_size=1,
                     shard_size=2)
    assert summary["dtype"] == dtype and summary["n_shards"] == 2
    assert summary["n_tokens"]["text"] > 0 and summary["n_tokens"]["image"] == 3 * 144
    stored = {(layer, s): load_activations(tmp_path, layer=layer, source=s)
              for layer in range(vlm.num_layers + 1) for s in ALL
              if s == "residual" or layer < vlm.num_layers}
    for sample in scenes[:3]:
        batch = vlm.prepare([sample.image], [cx.PROMPT])
        cols = np.arange(batch.seq_len)  # every token: the sample alone has no padding
        with capture(vlm, [cols], keys=True, values=True) as cap:
            vlm.forward(batch, logits_to_keep=1)
        for (layer, source), (vectors, rows) in stored.items():
            mine = np.flatnonzero(rows.column("sample").to_numpy(zero_copy_only=False)
                                  == sample.id)
            positions = rows.column("position").to_numpy()[mine]
            assert positions.tolist() == cols.tolist()  # image and text tokens, in order
            direct = getattr(cap, TABLE[source])[layer]
            got = vectors[torch.as_tensor(mine)]
            assert got.dtype == direct.dtype == getattr(torch, dtype)
            assert torch.equal(got, direct), (layer, source)
        ids = rows.column("token_id").to_numpy()[mine]
        assert ids.tolist() == batch.input_ids[0].tolist()
        kinds = rows.column("kind").to_numpy(zero_copy_only=False)[mine]
        image = batch.token_map.image_positions(0)
        assert (kinds == "image").sum() == len(image) and set(kinds) == {"image", "text"}


def test_a_padded_batch_indexes_each_sample_as_if_alone(tmp_path):
    """toy-qwen reads each image at its own size, so a batch of two sizes is left-padded:
    positions, token ids and boxes are still the sample's own, and the vectors are the
    batch's capture exactly (and the sample's alone to float rounding)."""
    vlm = vislens.load("toy-qwen")
    scenes = [shapesworld.make_scene(1000, 0, size=96), shapesworld.make_scene(1000, 1, size=160)]
    export(vlm, scenes, tmp_path, layers=(3,), sources=("residual", "values"), text=True,
           batch_size=2)
    batch = vlm.prepare([s.image for s in scenes], [cx.PROMPT] * 2)
    assert batch.attention_mask[0].sum() < batch.seq_len  # the first sample is padded
    valid = [np.flatnonzero(batch.attention_mask[b].numpy()) for b in range(2)]
    with capture(vlm, valid, layers=[3], values=True) as together:
        vlm.forward(batch, logits_to_keep=1)
    for source in ("residual", "values"):
        vectors, rows = load_activations(tmp_path, layer=3, source=source)
        for b, scene in enumerate(scenes):
            alone = vlm.prepare([scene.image], [cx.PROMPT])
            with capture(vlm, [np.arange(alone.seq_len)], layers=[3], values=True) as cap:
                vlm.forward(alone, logits_to_keep=1)
            mine = rows.filter(pa.compute.equal(rows.column("sample"), scene.id)).to_pydict()
            assert mine["position"] == list(range(alone.seq_len))
            assert mine["token_id"] == alone.input_ids[0].tolist()
            image = [i for i, k in enumerate(mine["kind"]) if k == "image"]
            boxes = np.array([[mine[k][i] for k in ("x0", "y0", "x1", "y1")] for i in image])
            assert np.array_equal(boxes, alone.token_map.box)
            got = vectors[torch.as_tensor(np.flatnonzero(
                rows.column("sample").to_numpy(zero_copy_only=False) == scene.id))]
            assert torch.equal(got, together.of(TABLE[source], 3, b))
            torch.testing.assert_close(got, getattr(cap, TABLE[source])[3], atol=1e-4,
                                       rtol=1e-4)


def test_the_dataset_iterator_streams_the_loaders_rows(toy, scenes, tmp_path):
    export(toy, scenes[:5], tmp_path, layers=(1,), sources=("values",), shard_size=2)
    vectors, rows = load_activations(tmp_path, layer=1, source="values")
    ds = ActivationDataset(tmp_path, layer=1, source="values")
    assert len(ds) == rows.num_rows == 5 * 144 and "activation" in ds.column_names
    every = list(ds)
    assert torch.equal(torch.stack([r["activation"] for r in every]), vectors)
    assert [r["sample"] for r in every] == rows.column("sample").to_pylist()
    batches = list(ds.iter(batch_size=100))
    assert [len(b["sample"]) for b in batches] == [100] * 7 + [20]
    assert torch.equal(torch.cat([b["activation"] for b in batches]), vectors)
    assert len(list(ds.iter(batch_size=100, drop_last_batch=True))) == 7
    for i in (0, 287, 288, 300, 575, 576, 719):  # parts of 288, 288 and 144 rows
        assert torch.equal(ds[i]["activation"], vectors[i]), i
        assert ds[i]["sample"] == rows.column("sample")[i].as_py()
    assert ds[-1]["row"] == 11 and ds[-1]["sample"] == scenes[4].id
    with pytest.raises(VislensError, match="has layers 1"):
        load_activations(tmp_path, layer=2, source="values")
    with pytest.raises(VislensError, match="has values"):
        read_index(tmp_path, layer=1, source="keys")


# ---- resume and sharding ---------------------------------------------------------------------
class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_export_resumes_to_the_same_files(toy, scenes, tmp_path, monkeypatch):
    options = dict(sources=("residual", "keys"), layers=(0, 3, 4), shard_size=2, batch_size=2)
    whole = tmp_path / "whole"
    expected = export(toy, scenes, whole, **options)
    cut = tmp_path / "cut"
    real_write, real_save = cx.ShardWriter.write, None
    import safetensors.torch as st

    real_save = st.save_file
    calls = []

    def write_then_stop(self, path, metadata):  # shard 1 lands, its index part does not
        nbytes = real_write(self, path, metadata)
        calls.append(path.name)
        if len(calls) == 2:
            raise Interrupted
        return nbytes

    monkeypatch.setattr(cx.ShardWriter, "write", write_then_stop)
    with pytest.raises(Interrupted):
        export(toy, scenes, cut, **options)
    assert sorted(files(cut)) == ["shards/shard-00000.safetensors",
                                  "shards/shard-00001.safetensors"]
    assert set(index(cut).column("sample").to_pylist()) == {s.id for s in scenes[:2]}

    def save_half_then_die(tensors, filename, metadata=None):  # killed inside the write
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(1000)
        raise Interrupted

    monkeypatch.setattr(cx.ShardWriter, "write", real_write)
    monkeypatch.setattr(st, "save_file", save_half_then_die)
    with pytest.raises(Interrupted):
        export(toy, scenes, cut, **options)
    # the half-written file is under its temporary name only, never the shard's
    assert (cut / "shards" / ".shard-00001.safetensors.tmp").stat().st_size == 1000
    assert sorted(files(cut)) == ["shards/shard-00000.safetensors",
                                  "shards/shard-00001.safetensors"]

    monkeypatch.setattr(st, "save_file", real_save)
    resumed = export(toy, scenes, cut, **options)
    assert files(cut) == files(whole)
    assert same(index(cut), index(whole))
    keys = list(zip(*(index(cut).column(k).to_pylist()
                      for k in ("sample", "position", "layer", "source"))))
    assert len(keys) == len(set(keys)) == 6 * 144 * 5  # residual 0, 3, 4; keys 0, 3
    with pytest.raises(VislensError, match="keys has no layer 4"):  # past the last layer
        load_activations(cut, layer=4, source="keys")
    assert json.dumps(resumed).replace(str(cut), "OUT") == \
        json.dumps(expected).replace(str(whole), "OUT")
    assert not list(cut.rglob("*.tmp"))
    parts = sorted((cut / "rows.parquet").iterdir())
    export(toy, scenes, cut, **options)  # nothing left to do
    assert sorted((cut / "rows.parquet").iterdir()) == parts


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_write_the_single_process_export(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # Ray stops workers when the machine is 95% full, whoever filled it (a shared machine)
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")
    args = ["capture", "--n", "5", "--shard-size", "2", "--batch-size", "2", "--layers",
            "1,4", "--sources", "residual,values", "--text", "--json"]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    two = runner.invoke(app, [*args, "--workers", "2", "--out", str(tmp_path / "two")])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert same(index(tmp_path / "two"), index(tmp_path / "one"))
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert json.loads(two.stdout)["n_shards"] == 3


# ---- bad input -------------------------------------------------------------------------------
def one_line_error(result) -> str:
    """The error line; the layer range is checked once the model is loaded (its depth), so
    transformers' loading bar may stand before it (as for `perceive --layers`)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines()
             if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--sources", "residual,attention"], "unknown source 'attention'"),
    (["--sources", ""], "--sources is empty"),
    (["--layers", "9"], "--layers 9 is out of range: the model has 4 layers"),
    (["--layers", "two"], "--layers must be all or a list"),
    (["--layers", "2,4", "--sources", "keys,values"], "keys, values exist for layers 0-3"),
    (["--shard-size", "0"], "--shard-size must be at least 1"),
    (["--data", "coco:/no/such/dir"], "/no/such/dir does not exist"),
    (["--data", "shapesworld:0"], "trained on"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, words, tmp_path):
    out = tmp_path / "run"
    line = one_line_error(runner.invoke(app, ["capture", "--n", "2", "--out", str(out), *args]))
    assert words in line, line
    assert not out.exists()


def test_a_directory_of_another_export_is_refused(toy, scenes, tmp_path):
    export(toy, scenes[:2], tmp_path, layers=(1,))
    with pytest.raises(VislensError, match="different configuration"):
        export(toy, scenes[:2], tmp_path, layers=(2,))
    with pytest.raises(VislensError, match="no capture directory"):
        load_activations(tmp_path / "elsewhere", layer=1)


# ---- CLI --------------------------------------------------------------------------------------
def test_help_has_an_example_and_json_gives_the_summary(tmp_path):
    shown = runner.invoke(app, ["capture", "--help"], terminal_width=200)
    assert shown.exit_code == 0 and "Example: vislens capture" in shown.output
    assert "--json" in shown.output and "--workers" in shown.output
    out = tmp_path / "acts"
    result = runner.invoke(app, ["capture", "--n", "3", "--layers", "0-1", "--sources",
                                 "residual,keys,values", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    summary = json.loads(result.stdout)
    assert summary["n_images"] == 3 and summary["layers"] == [0, 1]
    assert summary["shapes"] == {"residual": [128], "keys": [4, 32], "values": [4, 32]}
    assert summary["n_rows"] == 3 * 144 * 6 and summary["dtype"] == "float32"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary) == set(cx.CaptureSummary.__annotations__)  # the declared keys, all


# ---- memory ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_writer_holds_one_shard_at_most_over_200_images(toy, tmp_path, monkeypatch):
    """What stays bounded whatever the number of images: the shard buffer (timings and the
    process' memory are measured in benchmarks/capture_memory.py, not asserted)."""
    writers = []

    class Counted(cx.ShardWriter):
        def __init__(self):
            super().__init__()
            writers.append(self)

    monkeypatch.setattr(cx, "ShardWriter", Counted)
    samples = open_dataset("shapesworld", n=200)
    summary = export(toy, samples, tmp_path, layers=(0, 2, 4), sources=("residual", "keys",
                                                                        "values"),
                     shard_size=16, batch_size=8)
    per_image = 144 * (3 * 128 + 2 * 2 * 128) * 4  # tokens x numbers x float32
    assert summary["n_images"] == 200 and summary["n_shards"] == len(writers) == 13
    assert max(w.peak_bytes for w in writers) == 16 * per_image  # one full shard, no more
    assert all(w.held_bytes == 0 for w in writers)  # each let go of its shard once written
    assert summary["bytes"] > 200 * per_image  # what holding it all would have taken
    read = sum(len(b["sample"]) for b in
               ActivationDataset(tmp_path, layer=4, source="residual").iter(batch_size=512))
    assert read == 200 * 144


# ---- docs --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_docs_probe_snippet_runs(tmp_path):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "activations.md").read_text()
    code = re.search(r"```python\n(# probe.*?)```", doc, re.S).group(1)
    result = runner.invoke(app, ["capture", "--n", "12", "--layers", "2", "--out",
                                 str(tmp_path / "acts"), "--json"])
    assert result.exit_code == 0, result.output
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(code.replace("runs/acts", "acts").replace("EPOCHS = 300", "EPOCHS = 30"),
                     "docs/activations.md", "exec"), scope)  # noqa: S102
    finally:
        os.chdir(cwd)
    assert 0.0 <= scope["accuracy"] <= 1.0 and 0.0 < scope["chance"] < 1.0
