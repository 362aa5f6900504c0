"""The GPU check: 7B-shaped random-weight versions of the four paper checkpoints in bf16 on
one GPU, each experiment's core sweep timed on a few images against a plain forward of
the same model, with peak CUDA memory. `bash benchmarks/gpu_check.sh` (under 8 minutes
on one H200) writes benchmarks/GPU_CHECK.md; `--cpu-smoke` runs the same code on the
shrunk look-alikes on the CPU (what the test-suite-free CI of this script is).

The models are the look-alikes of tests/lookalikes/ (real processors, tokenizers,
special tokens, vocabularies) with the real widths and depths put back, initialised
randomly on the GPU: cost does not depend on the weights' values. Random weights answer
nothing right, so the sweeps are timed directly (the work a kept sample costs), not
through the experiments' keep filters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "GPU_CHECK.md"
REAL_TEXT = {  # the released language models' sizes
    "llava-1.5-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32),
    "llama3-llava-next-8b-hf": dict(hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=8),
    "llava-onevision-qwen2-7b-ov-hf": dict(hidden_size=3584, intermediate_size=18944,
                                           num_hidden_layers=28, num_attention_heads=28,
                                           num_key_value_heads=4),
    "Qwen2.5-VL-7B-Instruct": dict(hidden_size=3584, intermediate_size=18944,
                                   num_hidden_layers=28, num_attention_heads=28,
                                   num_key_value_heads=4),
}
REAL_VISION = {
    "clip": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, projection_dim=768),
    "siglip": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                   num_attention_heads=16),
    "qwen": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                 out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
}


def real_dir(name: str, shrunk: Path, out: Path) -> Path:
    """The look-alike's files with the real sizes in config.json (no weights)."""
    for f in shrunk.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy(f, out / f.name)
    config = json.loads((shrunk / "config.json").read_text())
    text = REAL_TEXT[name]
    if "text_config" in config:
        config["text_config"].update(text)
        config["text_config"].pop("head_dim", None)
    else:  # Qwen2.5-VL's flat layout
        config.update(text)
        config["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 24]}
        config["max_window_layers"] = text["num_hidden_layers"]
    kind = config["vision_config"].get("model_type", "qwen")
    config["vision_config"].update(REAL_VISION["clip" if "clip" in kind else
                                               "siglip" if "siglip" in kind else "qwen"])
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config))
    return out


def build(name: str, smoke: bool):
    """(VLM, device): real-size random bf16 on the GPU, or the look-alike on the CPU."""
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from lookalikes import checkpoint_dir

    from vislens.models.loading import detect_family, load_processor
    from vislens.models.vlm import VLM

    shrunk = checkpoint_dir(name)
    if smoke:
        import vislens

        return vislens.load(str(shrunk)), "cpu"
    path = real_dir(name, shrunk, Path(tempfile.mkdtemp()))
    family = detect_family(path)
    cfg = transformers.AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = getattr(transformers, family.model_class)._from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    return VLM(model, load_processor(path, family), family, name=f"{name} (7B shape)"), "cuda"


def timed(fn, device: str, repeats: int = 2) -> tuple[float, float]:
    """(median seconds, peak GB) of fn() after one warm-up run."""
    fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


@torch.no_grad()
def cases(vlm, scene) -> dict:
    """Each experiment's per-image core work on one scene (its small target)."""
    import numpy as np

    from vislens.experiments import ablation, knockout
    from vislens.experiments.batching import cut_batch
    from vislens.experiments.decoding import greedy
    from vislens.experiments.perception.features import extract
    from vislens.experiments.prompts import question
    from vislens.interventions import capture
    from vislens.interventions.continuation import advance, embed, record

    target = min(range(len(scene.instances)), key=lambda i: scene.instances[i].area)
    q = question(scene, target, "polling")
    one = vlm.prepare([scene.image], [q.prompt], [q.answer_prefix or None])
    feats = vlm.image_embeddings(one)
    tm = one.token_map
    mask = scene.instances[target].mask
    windows = [(s, min(s + 9, vlm.num_layers - 1)) for s in range(0, vlm.num_layers, 5)]
    windows.append((0, vlm.num_layers - 1))
    edges = knockout.edge_sets(tm, one, 0, mask)
    grid = [(c, w) for c in knockout.CONDITIONS for w in range(len(windows))]
    config = ablation.AblationConfig()
    positions = [tm.image_positions(0)]

    def plain():
        vlm.forward(one, image_features=feats, logits_to_keep=1)

    def lens():  # every image token decoded at every layer, top-5 kept, slice by slice
        with capture(vlm, positions) as cap:
            vlm.forward(one, image_features=feats, logits_to_keep=1)
        for layer in range(vlm.num_layers + 1):
            for rows in cap.of("residual", layer, 0).split(512):
                torch.softmax(vlm.unembed(rows).float(), -1).topk(5, dim=-1)

    def knock():
        _, cached = knockout.clean_pass(vlm, one, feats, [s for s, _ in windows])
        knockout.sweep(vlm, one, feats, edges, grid, windows, cached)

    def ablate_sweep():
        no_ig = ablation.AblationConfig(conditions=tuple(
            c for c in ablation.FIXED_CONDITIONS if c != "ig-matched"))
        sets = ablation.token_sets(vlm, one, feats, mask, no_ig, 0, q, "zeros", [])
        names = list(sets)
        # as the experiment runs it: each condition from its first ablated token, decoding
        # until its verdict is settled
        end = one.seq_len - 1
        clean = record(vlm, cut_batch(one, end), feats)
        rows = ablation.ablated_prefix(vlm, clean, [sets[n] for n in names], "zeros")
        last = embed(vlm, one.input_ids[:, end:].expand(len(names), -1))
        logits = advance(vlm, rows, last)[:, -1]
        greedy(vlm, rows, logits, config.max_new_tokens["polling"], settled=q.settled)

    def gradients():
        with torch.enable_grad():
            ablation.integrated_gradients(vlm, one, feats, int(one.input_ids[0, -1]), "zeros",
                                          config.ig_steps, config.ig_batch)

    def perceive():
        extract(vlm, [scene.image], ["Describe this image."])

    out = {}
    for label, fn in (("plain forward", plain), ("logit lens", lens), ("knockout sweep", knock),
                      ("ablation sweep (polling)", ablate_sweep),
                      ("integrated gradients", gradients), ("perceive capture", perceive)):
        out[label] = timed(fn, "cuda" if vlm.device.type == "cuda" else "cpu")
    out["_image_tokens"] = (int(len(tm) + len(tm.newline_positions(0))), np.nan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the same code on the shrunk look-alikes on the CPU")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --cpu-smoke, or on a GPU machine")
    sys.path.insert(0, str(ROOT / "tests"))
    from answer_head import scenes
    from lookalikes import PAPER as NAMES

    device = "CPU (smoke: shrunk look-alikes)" if args.cpu_smoke else \
        torch.cuda.get_device_name(0)
    lines = ["# GPU check", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d}, {device}, torch {torch.__version__}, "
             "bf16, random weights with the real sizes; median of 2 runs after a warm-up. "
             "`bash benchmarks/gpu_check.sh` regenerates it.", "",
             "| checkpoint (7B shape) | image tokens | experiment core | s / image | x plain "
             "forward | peak GB |", "|---|---|---|---|---|---|"]
    scene = scenes()[0]
    for name in NAMES:
        vlm, _ = build(name, args.cpu_smoke)
        got = cases(vlm, scene)
        base = got["plain forward"][0]
        tokens = got.pop("_image_tokens")[0]
        for label, (seconds, peak) in got.items():
            lines.append(f"| {name} | {tokens} | {label} | {seconds:.3f} | "
                         f"{seconds / base:.2f} | {peak:.1f} |")
            print(lines[-1], flush=True)
        del vlm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
