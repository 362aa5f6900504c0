"""Regenerate benchmarks/RESULTS.md: `python benchmarks/run.py` (`--quick`: toy only, fewer runs).

For every model: the logit-lens sweep, the ablation sweep, the knockout sweep,
the key/value capture of `perceive` and the activation patching sweep, each timed against a plain
transformers forward of the same model on the same batch and against the same
experiment written with nnsight and TransformerLens, in one run, with the
rivals' results checked equal to vislens' before any ratio is written.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # large tensors get their own mmap and go back to the OS when freed, so the
    # RSS growth during a call is that call's peak memory, not the allocator's history
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import cases as C  # noqa: E402
from benchmarks import models, rivals  # noqa: E402
from benchmarks.measure import compare  # noqa: E402

OUT = Path(__file__).resolve().parent / "RESULTS.md"
MEMORY_START, MEMORY_END = "<!-- memory:start -->", "<!-- memory:end -->"  # memory.py writes it


def build_context(vlm, args) -> C.Context:
    from vislens.data import shapesworld

    sample = shapesworld.make_scene(args.seed, 0)
    target = max(range(len(sample.instances)), key=lambda i: sample.instances[i].area)
    inst = sample.instances[target]
    q = shapesworld.questions(sample, "polling", target=target)[0]
    batch = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
    nn = rivals.nnsight_model(vlm.model)
    tl = None
    try:
        tl = rivals.transformer_lens_bridge(vlm.model, vlm.tokenizer)
    except Exception as exc:  # reported, never fatal: the other rivals still run
        print(f"TransformerLens bridge unavailable: {exc}", file=sys.stderr)
    size, stride = args.window, args.stride
    if size is None and vlm.num_layers > 4:  # the protocol's 10/32-of-depth windows, >= 2 wide
        size = stride = max(2, round(vlm.num_layers * 10 / 32))
    windows = C.knockout_windows(vlm.num_layers, size, stride)
    conds = None if vlm.num_layers <= 4 else ("object+1->last", "object+1->last-row")
    ablations = None if vlm.num_layers <= 4 else ("object", "object+1", "object+2", "register",
                                                  "random-matched", "all-but-object+1")
    return C.Context(vlm, batch, inst.mask, nn, tl, conds, ablations, windows)


def _max_diff(a, b) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def suites(ctx: C.Context):
    """(experiment, reference name, methods, vislens method name, checker) per experiment."""
    tl = ctx.tl is not None
    names, sets, vector = C.ablation_sets(ctx)
    grid, edges = C.knockout_grid(ctx)

    def same_topk(ref, got):
        frac = float((ref == got).float().mean())
        return frac >= 0.99, f"top-{C.TOP_K} ids equal on {frac:.1%}"

    def close(tol):
        def check(ref, got):
            if ref.shape != got.shape:  # never broadcast one row against another
                return False, f"shapes {tuple(ref.shape)} vs {tuple(got.shape)}"
            d = _max_diff(ref, got)
            return d <= tol, f"max |diff| {d:.1e}"
        return check

    tol = 1e-4 if ctx.vlm.dtype == torch.float32 else 5e-2
    lens = {"floor: forward with hidden states + one batched unembedding":
            lambda: C.lens_floor(ctx),
            "vislens": lambda: C.lens_vislens(ctx), "nnsight": lambda: C.lens_nnsight(ctx)}
    if tl:
        lens["TransformerLens"] = lambda: C.lens_tl(ctx)
    abl = {"plain forward": lambda: C.plain_forward(ctx, logits_to_keep=1),
           "vislens": lambda: C.ablate_vislens(ctx, sets, vector),
           "vislens, one batch, every position": lambda: C.ablate_batched(ctx, sets, vector),
           "vislens, one forward per condition": lambda: C.ablate_each(ctx, sets, vector),
           "nnsight": lambda: C.ablate_nnsight(ctx, sets, vector)}
    if tl:
        abl["TransformerLens"] = lambda: C.ablate_tl(ctx, sets, vector)
    ko = {"plain forward": lambda: C.plain_forward(ctx, logits_to_keep=1),
          "vislens": lambda: C.knockout_resumed(ctx, grid, edges),
          "vislens, one batch, no resume": lambda: C.knockout_batched(ctx, grid, edges),
          "vislens, one forward per condition": lambda: C.knockout_each(ctx, grid, edges),
          "nnsight": lambda: C.knockout_nnsight(ctx, grid, edges)}
    if tl:
        ko["TransformerLens"] = lambda: C.knockout_tl(ctx, grid, edges)
    kv = {"plain forward": lambda: C.plain_forward(ctx, logits_to_keep=1),
          "vislens": lambda: C.kv_vislens(ctx), "nnsight": lambda: C.kv_nnsight(ctx)}
    if tl:
        kv["TransformerLens"] = lambda: C.kv_tl(ctx)
    corrupt, groups = C.patch_setup(ctx)
    pt = {"plain forward": lambda: C.plain_forward(ctx, logits_to_keep=1),
          "vislens": lambda: C.patch_vislens(ctx, corrupt, groups),
          "vislens, whole passes": lambda: C.patch_whole(ctx, corrupt, groups),
          "nnsight": lambda: C.patch_nnsight(ctx, corrupt, groups)}
    if tl:
        pt["TransformerLens"] = lambda: C.patch_tl(ctx, corrupt, groups)
    n_img = len(ctx.positions)
    return [
        (f"logit lens ({ctx.vlm.num_layers + 1} layers x {n_img} image tokens, top-{C.TOP_K})",
         lens, same_topk),
        (f"ablation sweep ({len(sets)} conditions, answer logits)", abl, close(tol)),
        (f"knockout sweep ({len(grid) // len(ctx.windows)} conditions x {len(ctx.windows)} "
         f"windows)", ko, close(tol)),
        (f"K/V capture for perceive ({ctx.vlm.num_layers} layers x {n_img} image tokens)",
         kv, close(tol)),
        (f"activation patching sweep (residual, {ctx.vlm.num_layers} layers x {len(groups)} "
         "token groups, answer logits)", pt, close(tol)),
    ]


def bench_model(name: str, args) -> dict:
    print(f"== {name}", file=sys.stderr)
    vlm = models.BUILDERS[name]()
    ctx = build_context(vlm, args)
    repeats = args.repeats if args.repeats else (3 if args.quick or name != "toy" else 5)
    warmup = 1 if name == "toy" else 0  # big models: the first of the timed runs is kept
    device = vlm.device
    out = {"model": vlm.name, "device": str(device), "dtype": str(vlm.dtype).replace("torch.", ""),
           "seq": ctx.batch.seq_len, "experiments": []}
    for title, methods, check in suites(ctx):
        print(f"   {title}", file=sys.stderr)
        timings, results = compare(methods, repeats, device, warmup)
        ref_name = next(iter(methods))
        rows = []
        for m, t in timings.items():
            ok, note = (None, "")
            if m not in (ref_name, "vislens"):
                ok, note = check(results["vislens"], results[m])
            rows.append({"method": m, "median": t.median, "spread": t.spread, "peak": t.peak,
                         "equal": ok, "note": note})
        out["experiments"].append({"title": title, "reference": ref_name, "rows": rows,
                                   "repeats": repeats, "warmup": warmup})
    if ctx.tl is None:
        out["tl_missing"] = True
    return out


def machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": psutil.cpu_count(), "threads": torch.get_num_threads(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "load": os.getloadavg()}


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in
                     ("transformers", "nnsight", "transformer-lens", "torch"))


def render(results: list[dict], info: dict, load_after, args, seconds: float) -> str:
    lines = ["# vislens benchmarks", "",
             f"Regenerate with `python benchmarks/run.py` (`--quick`: toy only, 3 runs). "
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {seconds:.0f} s.", "",
             "## Machine", "",
             f"- CPU: {info['cpu']}, {info['cores']} cores, torch threads: {info['threads']}, "
             f"RAM {info['memory_gb']} GB",
             f"- GPU: {info['gpu']}" + ("" if info["gpu"] != "none" else
                                         " (no GPU was lent to this run: the LLaVA-1.5-7B-shaped "
                                         "bf16 model was not run; `--models llava7b` on a CUDA "
                                         "machine runs it)"),
             f"- load average (1, 5, 15 min) before: {_load(info['load'])}; after: "
             f"{_load(load_after)} ("
             + ("other jobs shared the CPU: compare ratios, not seconds"
                if info["load"][0] > 1.5 else "no other job beside it: the 1-minute load is "
                "the previous process fading and this run's own") + ")",
             f"- {versions()}, Python {info['python']}", "",
             "Each method is timed round-robin with the others (one warm-up call each), "
             "median and [min, max] over the runs. Peak = growth of the process RSS during "
             "one extra call (CPU, sampled every ms) or of allocated memory (CUDA). "
             "`ratio` = median / median of the first row of its table (a plain transformers "
             "forward of the same model on the one-sample batch; for the logit lens, that "
             "forward with hidden states plus one batched unembedding and top-k of the same "
             "rows, the least any logit lens does). `vs vislens` = rival median "
             "/ vislens median (above 1: vislens is faster). `equal`: the rival's result "
             "checked against vislens' on the same inputs.", ""]
    for res in results:
        lines += [f"## {res['model']} ({res['device']}, {res['dtype']}, {res['seq']} tokens)", ""]
        if res.get("tl_missing"):
            lines += ["TransformerLens could not wrap this model (see stderr of the run).", ""]
        for exp in res["experiments"]:
            rows = exp["rows"]
            ref = rows[0]["median"]
            ours = next(r for r in rows if r["method"] == "vislens")
            lines += [f"### {exp['title']}", "",
                      f"{exp['repeats']} timed runs per method, {exp['warmup']} warm-up.", "",
                      "| method | median s | [min, max] | ratio | vs vislens | peak MB | equal |",
                      "|---|---|---|---|---|---|---|"]
            for r in rows:
                vs = "" if r["method"] in ("vislens", exp["reference"]) else \
                    f"{r['median'] / ours['median']:.2f}x"
                eq = "" if r["equal"] is None else ("yes" if r["equal"] else "**NO**") + \
                    f" ({r['note']})"
                lines.append(f"| {r['method']} | {r['median']:.3f} | [{r['spread'][0]:.3f}, "
                             f"{r['spread'][1]:.3f}] | {r['median'] / ref:.2f} | {vs} | "
                             f"{r['peak']:.0f} | {eq} |")
            lines.append("")
        lines += targets(res)
    return "\n".join(lines) + "\n"


def _load(load) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


def targets(res: dict) -> list[str]:
    """The issue's targets, met or missed, for one model."""
    def get(prefix, method):
        exp = next(e for e in res["experiments"] if e["title"].startswith(prefix))
        return next((r for r in exp["rows"] if r["method"] == method), None), exp

    out = ["#### Targets", "", "| target | measured | met |", "|---|---|---|"]

    def row(label: str, ours: dict, other: dict, value: float, met: bool) -> None:
        # spreads that overlap cannot tell the two apart on this machine
        noise = ours["spread"][0] <= other["spread"][1] and other["spread"][0] <= ours["spread"][1]
        out.append(f"| {label} | {value:.2f}x{' (spreads overlap: within noise)' if noise else ''}"
                   f" | {'yes' if met else 'no'} |")

    lens, exp = get("logit lens", "vislens")
    ratio = lens["median"] / exp["rows"][0]["median"]
    row("logit lens <= 1.1x its floor (forward with hidden states + one batched unembedding)",
        lens, exp["rows"][0], ratio, ratio <= 1.1)
    kv, exp = get("K/V", "vislens")
    ratio = kv["median"] / exp["rows"][0]["median"]
    row("K/V capture <= 1.05x a plain forward", kv, exp["rows"][0], ratio, ratio <= 1.05)
    ko, _ = get("knockout", "vislens")
    each, _ = get("knockout", "vislens, one forward per condition")
    speed = each["median"] / ko["median"]
    row("knockout sweep >= 2x faster than one full forward per condition", ko, each, speed,
        speed >= 2)
    for prefix, label in (("ablation", "ablation sweep"), ("knockout", "knockout sweep"),
                          ("activation patching", "activation patching sweep")):
        ours, _ = get(prefix, "vislens")
        nn, _ = get(prefix, "nnsight")
        speed = nn["median"] / ours["median"]
        mem_ok = ours["peak"] <= nn["peak"] * 1.05 + 1
        row(f"{label} >= 1.5x faster than nnsight (results equal: "
            f"{'yes' if nn['equal'] else 'NO'}; peak {ours['peak']:.0f} vs {nn['peak']:.0f} MB)",
            ours, nn, speed, speed >= 1.5 and nn["equal"] and mem_ok)
    return out + [""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy only, 3 runs per method")
    p.add_argument("--models", default=None,
                   help="comma list of toy,mid,llava7b (default: toy,mid; llava7b too on CUDA)")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per method")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--window", type=int, default=None, help="knockout window size")
    p.add_argument("--stride", type=int, default=None, help="knockout window stride")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--notes", type=Path, default=Path(__file__).resolve().parent / "NOTES.md",
                   help="appended verbatim to RESULTS.md (analysis of the numbers)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        names = ["toy"] if args.quick else ["toy", "mid"] + (
            ["llava7b"] if torch.cuda.is_available() else [])
    unknown = [m for m in names if m not in models.BUILDERS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(models.BUILDERS)}")
    info = machine()
    t0 = time.time()
    results = [bench_model(name, args) for name in names]
    text = render(results, info, os.getloadavg(), args, time.time() - t0)
    if args.notes.exists():
        text += "\n" + args.notes.read_text()
    old = args.out.read_text() if args.out.exists() else ""
    if MEMORY_START in old and MEMORY_END in old:  # benchmarks/memory.py's section stays
        text += "\n" + old[old.index(MEMORY_START):old.index(MEMORY_END) + len(MEMORY_END)] + "\n"
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
