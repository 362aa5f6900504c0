"""Peak memory of `vislens capture` and of reading its export back, against the number of
images.

    python benchmarks/capture_memory.py              # 50 and 200 toy images
    python benchmarks/capture_memory.py --n 50 200 800 --shard-size 16

Each count runs in a fresh process, as benchmarks/memory.py measures: the peak-RSS mark
is reset (/proc/self/clear_refs) right after the model is loaded and read (VmHWM) when
the command returns, so "capture growth" is the export's own peak over the loaded model
(the data set is opened before the model, so the samples, which every command holds, are
in "base", not in the growth). Then the mark is reset again and the export is read back
two ways: streamed (ActivationDataset.iter over every stored layer and source) and
load_activations of one layer and source (whose result grows with the images by design).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(field: str) -> float:
    """A VmRSS / VmHWM line of /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset() -> float:
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    return _status("VmRSS")


def child(n: int, shard_size: int, out: Path, result: Path) -> None:
    import vislens.models
    from vislens.cli import app
    from vislens.data.activations import ActivationDataset, load_activations

    marks: dict = {}
    real_load = vislens.models.load

    def load(*args, **kwargs):
        vlm = real_load(*args, **kwargs)
        marks["base"] = _reset()
        return vlm

    vislens.models.load = load
    argv = ["capture", "--model", "toy", "--data", "shapesworld", "--n", str(n),
            "--sources", "residual,keys,values", "--shard-size", str(shard_size),
            "--out", str(out), "--json"]
    t0 = time.perf_counter()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        app(argv, standalone_mode=False)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    summary = json.loads(printed.getvalue())
    base = _reset()
    rows = 0
    config = json.loads((out / "config.json").read_text())
    for name in config["tensors"]:
        source, layer = name.split("/")
        for batch in ActivationDataset(out, layer=int(layer), source=source).iter(4096):
            rows += len(batch["sample"])
    streamed = _status("VmHWM") - base
    base_load = _reset()
    vectors, _ = load_activations(out, layer=2, source="residual")
    loaded = _status("VmHWM") - base_load
    result.write_text(json.dumps({
        "images": summary["n_images"], "export_mb": round(summary["bytes"] / 2**20, 1),
        "shards": summary["n_shards"], "base_mb": round(marks["base"], 1),
        "capture_growth_mb": round(peak - marks["base"], 1), "capture_s": round(seconds, 1),
        "stream_rows": rows, "stream_growth_mb": round(streamed, 1),
        "load_one_growth_mb": round(loaded, 1),
        "load_one_result_mb": round(vectors.nbytes / 2**20, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--child", nargs=3, metavar=("N", "OUT", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, out, result = args.child
        child(int(n), args.shard_size, Path(out), Path(result))
        return
    rows = []
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            subprocess.run([sys.executable, __file__, "--shard-size", str(args.shard_size),
                            "--child", str(n), str(Path(tmp) / "acts"), str(result)],
                           check=True, cwd=ROOT)
            rows.append(json.loads(result.read_text()))
            print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
