"""What each experiment costs per image on the four paper checkpoints, measured on their
look-alikes and extrapolated to the real 7-8B models: `python benchmarks/real_checkpoints.py`
writes benchmarks/REAL_CHECKPOINTS.md (about 10 min on a 2-core CPU).

The look-alikes (tests/checkpoints.py, answers fitted by tests/answer_head.py) have the
real processors, token counts, vocabularies and prompts, so the WORK an experiment
asks of the language model per image (how many prompt tokens it runs, how many decode
steps, how long its sequences are) is exactly what the real model is asked; only the
width and depth differ. Each run counts that work with a hook on the language model,
on 1 and on 3 images (the difference, halved, is the per-image cost), in a fresh
process so its peak memory is its own. The 7B columns then price the counted work:

- prefill: 2 x LM parameters FLOPs per token plus 4 x layers x hidden x sequence per
  token for attention (and, for the logit lens, 2 x hidden x vocabulary per token and
  layer), at SUSTAINED_FLOPS (an assumption, stated in the output);
- decode: each decode call reads the bf16 weights once, at MEMORY_BANDWIDTH;
- memory: bf16 weights, plus the largest call's activations (rows x sequence x
  (4 hidden + 2 MLP width) x 2 bytes); for perceive also the keys and values it spills
  per image to its temporary feature file (tokens x layers x 2 x KV width x 2 bytes,
  every layer, bf16) and what it holds in RAM per image while a task compares the
  images of an item (one source at a time: tokens x hidden x 4 bytes at most, the
  projector's width, in float32).

They are estimates of a GPU run, not measurements: where a device is lent, time the
real shapes with benchmarks/run.py instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "REAL_CHECKPOINTS.md"
EXPERIMENTS = ("ablate", "logit-lens", "knockout", "attention", "perceive")
SUSTAINED_FLOPS = 400e12  # bf16 prefill on one H100 / H200 (~40% of dense peak)
MEMORY_BANDWIDTH = 3.3e12  # bytes/s, H100 SXM HBM3 (H200: 4.8e12)
REAL = {  # the real language models (configs in shared/notes/real-checkpoints.md)
    "llava-1.5-7b-hf": dict(params=6.74e9, vision=0.30e9, layers=32, hidden=4096, ff=11008,
                            vocab=32064, kv=4096),
    "llama3-llava-next-8b-hf": dict(params=8.03e9, vision=0.30e9, layers=32, hidden=4096,
                                    ff=14336, vocab=128320, kv=1024),
    "llava-onevision-qwen2-7b-ov-hf": dict(params=7.62e9, vision=0.40e9, layers=28,
                                           hidden=3584, ff=18944, vocab=152128, kv=512),
    "Qwen2.5-VL-7B-Instruct": dict(params=7.62e9, vision=0.67e9, layers=28, hidden=3584,
                                   ff=18944, vocab=152064, kv=512),
}


def _counter(vlm):
    """Count prefill tokens, attention work and decode calls the LM runs."""
    from vislens.interventions.ablate import _past_length

    work = {"prefill_tokens": 0, "prefill_seq_sq": 0, "prefill_calls": 0, "decode_calls": 0,
            "decode_rows": 0, "max_rows_x_seq": 0}

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return
        b, s = int(embeds.shape[0]), int(embeds.shape[1])
        if _past_length(kwargs) > 0:
            work["decode_calls"] += 1
            work["decode_rows"] += b
        else:
            work["prefill_calls"] += 1
            work["prefill_tokens"] += b * s
            work["prefill_seq_sq"] += b * s * s
            work["max_rows_x_seq"] = max(work["max_rows_x_seq"], b * s)

    vlm.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return work


def child(name: str, experiment: str, k: int) -> dict:
    """One measurement, in this (fresh) process: run `experiment` on k images."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from answer_head import fitted_dir, lens_scenes, scenes

    import vislens

    torch.set_num_threads(2)
    vlm = vislens.load(str(fitted_dir(name)))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    work = _counter(vlm)
    out = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    if experiment == "ablate":
        from vislens.experiments import ablation

        ablation.execute(vlm, scenes()[:k], ablation.AblationConfig(area=(1000, 2000)),
                         out / "a", {"model": name})
    elif experiment == "logit-lens":
        from vislens.experiments import logit_lens

        samples = (lens_scenes() * 3)[:k]
        for i, s in enumerate(samples):
            s.id = f"{s.id}-{i}"
        logit_lens.execute(vlm, samples, logit_lens.LensConfig(area=(20000, 30000), viewers=0),
                           out / "l", {"model": name})
    elif experiment == "knockout":
        from vislens.experiments import knockout

        knockout.execute(vlm, scenes()[:k], knockout.KnockoutConfig(area=(1000, 2000)),
                         out / "k", {"model": name})
    elif experiment == "attention":
        from vislens.experiments import attention

        attention.execute(vlm, scenes()[:k], attention.AttentionConfig(area=(1000, 2000),
                                                                       viewers=0),
                          out / "t", {"model": name})
    elif experiment == "perceive":
        from vislens.experiments.perception.features import extract

        images = [s.image for s in scenes()[:k]]
        extract(vlm, images, ["Describe this image."] * k)  # every layer, every source
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_after_load_mb": base_rss, **work}


def measure(name: str, experiment: str, k: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, experiment, str(k)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {experiment} k={k} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_image(one: dict, three: dict) -> dict:
    return {k: (three[k] - one[k]) / 2 for k in one if k != "max_rows_x_seq"} | {
        "max_rows_x_seq": three["max_rows_x_seq"]}


def extrapolate(name: str, experiment: str, work: dict) -> dict:
    r = REAL[name]
    flops = 2 * r["params"] * work["prefill_tokens"] + \
        4 * r["layers"] * r["hidden"] * work["prefill_seq_sq"]
    if experiment == "logit-lens":  # every image token unembedded at every layer
        flops += work["prefill_tokens"] * (r["layers"] + 1) * 2 * r["hidden"] * r["vocab"]
    weights = 2 * (r["params"] + r["vision"])
    seconds = flops / SUSTAINED_FLOPS + work["decode_calls"] * weights / MEMORY_BANDWIDTH
    act = work["max_rows_x_seq"] * (4 * r["hidden"] + 2 * r["ff"]) * 2
    spilled = work["prefill_tokens"] * r["layers"] * 2 * r["kv"] * 2 \
        if experiment == "perceive" else 0
    held = work["prefill_tokens"] * r["hidden"] * 4 if experiment == "perceive" else 0
    return {"seconds": seconds, "weights_gb": weights / 1e9, "activations_gb": act / 1e9,
            "disk_features_gb": spilled / 1e9, "ram_features_mb": held / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("NAME", "EXPERIMENT", "K"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the table from the last measurements (no new runs)")
    args = parser.parse_args()
    if args.child:
        name, experiment, k = args.child
        print(json.dumps(child(name, experiment, int(k))))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import NAMES

    lines = [
        "# Cost per image on the paper checkpoints",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} CPU cores with "
        "`python benchmarks/real_checkpoints.py` (see its docstring for the method). "
        "Fixture columns are measured on the look-alikes (LM 64 wide, 2 layers; real "
        "processors, token counts, vocabularies); 7B columns price the same counted work on "
        f"one GPU at {SUSTAINED_FLOPS / 1e12:.0f} TFLOP/s sustained bf16 prefill and "
        f"{MEMORY_BANDWIDTH / 1e12:.1f} TB/s for decode steps: estimates, not measurements.",
        "",
        "| checkpoint | experiment | LM prompt tokens / image | decode calls / image | "
        "fixture s / image | fixture peak RSS MB | 7B s / image (est.) | 7B GPU GB (est.: "
        "weights + largest call) | 7B features / image (est.): disk GB (bf16) + RAM MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    raw_path = args.out.with_suffix(".json")
    raw = json.loads(raw_path.read_text()) if args.table_only else {}
    for name in NAMES:
        for experiment in EXPERIMENTS:
            key = f"{name}/{experiment}"
            if not args.table_only:
                raw[key] = [measure(name, experiment, 1), measure(name, experiment, 3)]
                raw_path.write_text(json.dumps(raw, indent=1))
            one, three = raw[key]
            work = per_image(one, three)
            est = extrapolate(name, experiment, work)
            lines.append(
                f"| {name} | {experiment} | {work['prefill_tokens']:,.0f} | "
                f"{work['decode_calls']:,.0f} | {work['seconds']:.2f} | "
                f"{three['peak_rss_mb']:,.0f} | {est['seconds']:.2f} | "
                f"{est['weights_gb']:.1f} + {est['activations_gb']:.1f} | "
                + (f"{est['disk_features_gb']:.2f} + {est['ram_features_mb']:.0f} |"
                   if experiment == "perceive" else "- |"))
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
