"""Peak memory of logit-lens, perceive and ablate --reference against the number of images.

    python benchmarks/memory.py                      # this checkout, label "after"
    python benchmarks/memory.py --src OLD/src --label before   # another checkout's code

Each measurement is one fresh process running the command as a user would (the
CLI, in process), so nothing of an earlier measurement is left in its heap. The
process resets its peak-RSS mark (/proc/self/clear_refs) right after the model
is loaded and reads it (VmHWM) when the command returns: the "growth" reported
is the experiment's own peak over the loaded model, and it is what should not
grow with the number of images. On CUDA (--device cuda) torch's peak allocated
bytes over the same span are recorded too.

What "number of images" means for each experiment:
- logit-lens: N ShapesWorld images (`--n N`), every image token at every layer;
- perceive: ONE temp-corr item, a DAVIS-format video of N frames (all frames of an
  item are compared together, which is what held every layer of every frame);
- ablate: N images in the `--reference imagenet:DIR` folder (640x480 JPEGs, the
  size of an ImageNet / COCO photo) for the mean embedding; 2 images ablated.

Models: the shipped toy and LLaVA-1.5-geometry fixtures (576 image tokens,
random weights, a small fixed vision tower) of growing LM width and depth, saved
as Hugging Face directories once under ~/.cache/vislens/bench-fixtures. Results
go to benchmarks/MEMORY.json (one entry per label) and to the memory section of
benchmarks/RESULTS.md, before / after side by side when both labels are there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
STORE = ROOT / "benchmarks" / "MEMORY.json"
START, END = "<!-- memory:start -->", "<!-- memory:end -->"
FIXTURES = {"w256-d4": (256, 4), "w512-d4": (512, 4), "w512-d8": (512, 8)}
MODELS = ("toy", *FIXTURES)
EXPERIMENTS = ("logit-lens", "perceive", "ablate")
COUNTS = {"logit-lens": (2, 8, 32, 128), "perceive": (2, 8, 32), "ablate": (2, 8, 32, 128)}
WHAT = {"logit-lens": "images", "perceive": "frames of one video",
        "ablate": "reference images"}


# ---- the measured process ------------------------------------------------------------------------
def _status(field: str) -> float:
    """A VmRSS / VmHWM line of /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(argv: list[str], result: Path, device: str) -> None:
    """Run one vislens command in this process; write its memory figures to `result`."""
    import torch

    import vislens.models

    marks: dict = {}
    real_load = vislens.models.load

    def load(*args, **kwargs):
        vlm = real_load(*args, **kwargs)
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
        marks["base"] = _status("VmRSS")
        if torch.cuda.is_available() and device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            marks["cuda_base"] = torch.cuda.memory_allocated() / 2**20
        return vlm

    vislens.models.load = load
    spilled = _watch_spill()
    from vislens.cli import app

    t0 = time.perf_counter()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the command's --json summary
        app(argv, standalone_mode=False)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    out = {"base_mb": round(marks["base"], 1), "peak_mb": round(peak, 1),
           "growth_mb": round(peak - marks["base"], 1), "seconds": round(seconds, 1)}
    if "cuda_base" in marks:
        out["cuda_growth_mb"] = round(torch.cuda.max_memory_allocated() / 2**20
                                      - marks["cuda_base"], 1)
    summary = json.loads(printed.getvalue())
    if "n_images" in summary:  # the lens keeps only images with one large object
        out["images"] = summary["n_images"]
    if spilled is not None and spilled["max"]:
        out["spill_mb"] = round(spilled["max"] / 2**20, 1)
    result.write_text(json.dumps(out))


def _watch_spill() -> dict | None:
    """Largest feature file perceive wrote (code that has one), to report beside the RSS."""
    try:
        from vislens.experiments.perception.features import FeatureStore
    except ImportError:
        return None
    seen = {"max": 0}
    write = FeatureStore.write

    def watched(self, *args, **kwargs):
        write(self, *args, **kwargs)
        seen["max"] = max(seen["max"], self.nbytes)

    FeatureStore.write = watched
    return seen


# ---- fixtures and data ---------------------------------------------------------------------------
def fixture(name: str) -> str:
    """The model argument of a benchmark model: "toy" or a saved fixture directory."""
    if name == "toy":
        return "toy"
    width, depth = FIXTURES[name]
    path = Path.home() / ".cache" / "vislens" / "bench-fixtures" / name
    if (path / "config.json").is_file():
        return str(path)
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.models import _llava

    text = dict(vocab_size=8 * width, hidden_size=width, intermediate_size=int(2.6875 * width),
                num_hidden_layers=depth, num_attention_heads=width // 64,
                num_key_value_heads=width // 64)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, projection_dim=64)
    vlm = _llava(name, text, vision, "cpu", torch.float32)
    tok = vlm.processor.tokenizer  # a word per id: every decoded id has a word, as in a real
    tok.add_tokens([f"w{i}" for i in range(text["vocab_size"] - len(tok))])  # vocabulary
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    vlm.model.save_pretrained(tmp)
    vlm.processor.save_pretrained(tmp)
    tmp.rename(path)
    return str(path)


def make_data(root: Path, experiment: str, n: int) -> Path:
    """The data one measurement reads (the same bytes for every label: all seeded)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from native_formats import write_davis, write_image_folder

    from vislens.data import shapesworld
    from vislens.data import tasks as shapes_tasks

    path = root / f"{experiment}-{n}"
    if path.exists():
        return path
    if experiment == "perceive":
        write_davis(path, shapes_tasks.videos(1, seed=1000, frames=n))
    elif experiment == "ablate":
        scenes = shapesworld.generate(n, seed=1001)
        for s in scenes:
            s.image = s.image.resize((640, 480))
        write_image_folder(path, scenes)
    else:
        path.mkdir(parents=True)
    return path


def command(experiment: str, model: str, n: int, data: Path, out: Path, device: str
            ) -> list[str]:
    common = ["--model", model, "--out", str(out), "--device", device, "--json"]
    if experiment == "logit-lens":
        return ["logit-lens", "--data", "shapesworld", "--n", str(n), "--viewers", "1",
                *common]
    if experiment == "perceive":
        return ["perceive", "--tasks", "temp-corr", "--n", "1", "--data",
                f"temp-corr=davis:{data}", *common]
    return ["ablate", "--data", "shapesworld", "--n", "2", "--settings", "polling",
            "--conditions", "object", "--reference", f"imagenet:{data}", *common]


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def wait_for_memory(need_mb: float, patience_s: float = 3600) -> float:
    """Wait until the machine has `need_mb` available: under memory pressure the kernel
    drops the file pages of a process (its mapped weights, its libraries) and its RSS
    shrinks, which would read as a saving."""
    t0 = time.time()
    while (free := available_mb()) < need_mb and time.time() - t0 < patience_s:
        print(f"waiting: {free:.0f} MB available, {need_mb:.0f} wanted", file=sys.stderr)
        time.sleep(30)
    return free


def measure(src: Path, experiment: str, model: str, n: int, data: Path, work: Path,
            device: str, threads: int, need_mb: float = 6000) -> dict:
    """One fresh process, the code under `src`, one command."""
    free = wait_for_memory(need_mb)
    result = work / f"result-{experiment}-{Path(model).name}-{n}.json"
    out = work / f"run-{experiment}-{Path(model).name}-{n}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resumed one
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": str(threads),
           "VISLENS_CACHE": tempfile.mkdtemp(dir=work, prefix="cache-"),  # no cached vector
           # freed tensors go back to the OS at once, as in benchmarks/run.py
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    argv = command(experiment, model, n, data, out, device)
    proc = subprocess.run([sys.executable, __file__, "--child", str(result), "--device", device,
                           "--", *argv], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{experiment} {model} n={n} failed:\n{proc.stderr[-3000:]}")
    got = json.loads(result.read_text())
    got["available_mb"] = round(min(free, available_mb()))  # before and after: no pressure
    return got


# ---- the report ----------------------------------------------------------------------------------
def render(store: dict) -> str:
    labels = [x for x in ("before", "after") if x in store] + \
        [x for x in store if x not in ("before", "after")]
    first = store[labels[-1]]
    lines = [START, "## Memory against the number of images", "",
             f"`python benchmarks/memory.py` (`--src OLD/src --label before` for another "
             f"checkout). Each figure is one fresh process running the CLI command; MB = the "
             f"peak RSS of the command over the RSS right after its model was loaded "
             f"(/proc/self/status VmHWM after a clear_refs reset), i.e. what the experiment "
             f"itself holds at its worst. Machine: {first['machine']}.", ""]
    for label in labels:
        meta = store[label]
        lines.append(f"- {label}: {meta['code']}, measured {meta['date']} on {meta['device']}")
    lines.append("")
    for exp in EXPERIMENTS:
        counts = sorted({int(n) for label in labels
                         for n in store[label]["results"].get(exp, {}).get("toy", {})} |
                        {int(n) for label in labels for m in store[label]["results"].get(exp, {})
                         for n in store[label]["results"][exp][m]})
        if not counts:
            continue
        kept = {n: next((store[lb]["results"][exp][m][str(n)]["images"] for lb in labels
                         for m in store[lb]["results"].get(exp, {})
                         if "images" in store[lb]["results"][exp][m].get(str(n), {})), None)
                for n in counts}
        header = [f"N={n}" + ("" if kept[n] is None else f" ({kept[n]} kept)") for n in counts]
        lines += [f"### {exp}: peak MB against the number of {WHAT[exp]}", "",
                  "| model | " + " | ".join(header) +
                  " | MB per extra image, last two N |", "|---|" + "---|" * (len(counts) + 1)]
        models = [m for m in MODELS if any(m in store[lb]["results"].get(exp, {})
                                           for lb in labels)]
        for model in models:
            cells = []
            for n in counts:
                got = [store[lb]["results"].get(exp, {}).get(model, {}).get(str(n))
                       for lb in labels]
                cells.append(" → ".join("-" if g is None else _cell(g) for g in got))
            slopes = [_slope(store[lb]["results"].get(exp, {}).get(model, {})) for lb in labels]
            lines.append(f"| {model} | " + " | ".join(cells) + " | " +
                         " → ".join("-" if s is None else f"{s:+.1f}" for s in slopes) + " |")
        lines.append("")
    if len(labels) > 1:
        lines += [f"Cells read {' → '.join(labels)}; in brackets, the largest temporary "
                  "feature file perceive wrote (MB on disk, not in the RSS). The toy is 4 "
                  "layers x 128 wide (144 image tokens); the fixtures are named by LM width "
                  "and depth (576 image tokens).", ""]
    lines += NOTES + ["", END]
    return "\n".join(lines) + "\n"


NOTES = [
    "What the memory grows with:",
    "",
    "- **logit-lens** kept a Python dict per (image token, layer) until the summary, so it "
    "grew by tokens x (layers + 1) rows per image (the before slope, steeper with depth). "
    "It now writes one row per image token with lists over the layers, built from numpy, "
    "and tallies the summary part by part: what is left is one batch's work (4 images: "
    "the residual stream of every layer at the image tokens, [layers + 1, 4 x tokens, "
    "width] in float32, and at most 64 MB of logits at once), which grows with depth x "
    "width x tokens, not with the images. The first batches differ (the lens keeps only "
    "images with one large object, so N=8 may fill under two batches; allocator pools "
    "grow once), then the curve is flat.",
    "- **perceive** held every layer's keys and values (float32) of every frame of the "
    "item: tokens x layers x 2 x width x 4 bytes per frame. Now each layer goes to a "
    "temporary file as the forward computes it (the bracketed MB: it grows with frames x "
    "layers, on disk) and tasks read one source back at a time, so RAM holds one forward "
    "batch (8 frames) plus one source of every frame of the item in float32 (tokens x "
    "width x 4 bytes per frame: the remaining slope). Scores are bit-identical "
    "(tests/test_memory.py).",
    "- **ablate --reference imagenet:DIR** read the whole folder into a list (a decoded "
    "640x480 image is 0.9 MB: ImageNet val's 50,000 would be ~46 GB); it now streams the "
    "folder a batch (8) at a time, for the cache key and for the mean. What is left "
    "grows with the model (the ablation forwards), not with the reference set.",
    "",
    "On CUDA (`--device cuda`) each cell also gets the peak allocated GPU memory over the "
    "loaded model; no GPU was lent to these runs.",
]


def _cell(got: dict) -> str:
    spill = f" [{got['spill_mb']:.0f}]" if "spill_mb" in got else ""
    cuda = f" (cuda {got['cuda_growth_mb']:.0f})" if "cuda_growth_mb" in got else ""
    return f"{got['growth_mb']:.0f}{spill}{cuda}"


def _slope(per_n: dict) -> float | None:
    """MB per extra image between the two largest N measured (past the first batch, whose
    forward grows with the images in it up to --batch-size)."""
    if len(per_n) < 2:
        return None
    ns = sorted(int(n) for n in per_n)[-2:]
    lo, hi = (per_n[str(n)] for n in ns)
    images = [g.get("images", n) for g, n in ((lo, ns[0]), (hi, ns[1]))]  # the lens keeps fewer
    return (hi["growth_mb"] - lo["growth_mb"]) / max(images[1] - images[0], 1)


def write_section(text: str, path: Path) -> None:
    """Put the memory section into RESULTS.md in place of the old one (or at the end)."""
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        new = old[:old.index(START)] + text.rstrip("\n") + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"


def code_label(src: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return f"`{src}` at {rev}"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return f"`{src}`"


def main(argv=None) -> None:
    if argv is None and "--child" in sys.argv:
        i = sys.argv.index("--child")
        device = sys.argv[sys.argv.index("--device") + 1]
        child(sys.argv[sys.argv.index("--") + 1:], Path(sys.argv[i + 1]), device)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=ROOT / "src", help="the vislens code measured")
    p.add_argument("--label", default="after", help="key of these results (before / after)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--experiments", default=",".join(EXPERIMENTS))
    p.add_argument("--quick", action="store_true", help="toy and w256-d4, N = 2 and 8 only")
    p.add_argument("--counts", default=None, help="comma list of N (default: per experiment)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--store", type=Path, default=STORE)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--code", default=None, help="how to describe the code measured "
                   "(default: --src and its last commit)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the RESULTS.md section from --store, measure nothing")
    args = p.parse_args(argv)
    if args.render_only:
        write_section(render(json.loads(args.store.read_text())), args.out)
        return
    models = ["toy", "w256-d4"] if args.quick else [m.strip() for m in args.models.split(",")]
    experiments = [e.strip() for e in args.experiments.split(",")]
    store = json.loads(args.store.read_text()) if args.store.exists() else {}
    entry = store.setdefault(args.label, {"results": {}})
    entry.update(code=args.code or code_label(args.src), device=args.device, machine=machine(),
                 date=f"{datetime.now(timezone.utc):%Y-%m-%d}")
    with tempfile.TemporaryDirectory(prefix="vislens-memory-") as tmp:
        work = Path(tmp)
        for exp in experiments:
            counts = COUNTS[exp][:2] if args.quick else COUNTS[exp]
            if args.counts:
                counts = [int(x) for x in args.counts.split(",")]
            for model in models:
                path = fixture(model)
                for n in counts:
                    data = make_data(work / "data", exp, n)
                    got = measure(args.src.resolve(), exp, path, n, data, work, args.device,
                                  args.threads)
                    entry["results"].setdefault(exp, {}).setdefault(model, {})[str(n)] = got
                    print(f"{args.label} {exp} {model} N={n}: {got}", file=sys.stderr)
                    args.store.write_text(json.dumps(store, indent=1) + "\n")
    write_section(render(store), args.out)
    print(f"wrote {args.out} and {args.store}", file=sys.stderr)


if __name__ == "__main__":
    main()
