"""bfloat16 / float16 give the float32 answers within stated tolerances, on the shipped toy
(trained weights: logits and features of a real model's scale).

Tolerances (measured here, then bounded): logit-lens top-1 agreement >= 97% (bf16,
8-bit mantissa) / 99% (fp16); knockout verdicts differ on at most one kept sample per
condition and window; perception scores within 0.06 (fg-seg, sem-seg).
"""

import numpy as np
import pytest

import vislens
from vislens.data import shapesworld
from vislens.experiments import knockout, logit_lens
from vislens.experiments.perception import perceive
from vislens.runs.rundir import RunDir

# three dtypes' runs on the toy in one fixture (~10 s on 2 cores): the full run only
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    samples = shapesworld.generate(10, seed=1000)
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        vlm = vislens.load("toy", dtype=dtype)
        assert str(vlm.dtype) == f"torch.{dtype}"
        root = tmp_path_factory.mktemp(dtype)
        cfg = knockout.KnockoutConfig(area=(0, 350), settings=("polling",),
                                      conditions=("object+1->last", "image->question"))
        ko = knockout.run(vlm, samples, cfg, RunDir(root / "k", {}, key=[
            "sample", "setting", "condition", "window"]))
        lens_dir = RunDir(root / "l", {}, key=["sample"])
        logit_lens.run(vlm, samples[:3], logit_lens.LensConfig(area=(350, float("inf")),
                                                               viewers=0), lens_dir)
        per = perceive.run(vlm, perceive.PerceiveConfig(n=4, tasks=("fg-seg", "sem-seg")),
                           RunDir(root / "p", {}, key=["condition", "task", "item"]))
        out[dtype] = (ko, lens_dir.rows(), per)
    return out


@pytest.mark.parametrize("dtype, floor", [("bfloat16", 0.97), ("float16", 0.99)])
def test_half_precision_matches_float32(runs, dtype, floor):
    ko32, lens32, per32 = runs["float32"]
    ko, lens, per = runs[dtype]
    # a row per image token, top-k ids per layer
    top1 = {(r["sample"], r["position"]): [k[0] for k in r["topk_ids"]] for r in lens32}
    agree = np.mean([a == b for r in lens for a, b in zip(
        top1[(r["sample"], r["position"])], (k[0] for k in r["topk_ids"]), strict=True)])
    assert agree >= floor, agree
    assert ko["n_kept"] == ko32["n_kept"] and sum(ko32["n_kept"].values()) > 0
    n = ko32["n_kept"]["polling"]
    for cond, values in ko32["relative_accuracy"].items():
        for a, b in zip(values, ko["relative_accuracy"][cond], strict=True):
            assert a is not None and round(abs(a - b) * n) <= 1, (cond, a, b)
    for task in ("fg-seg", "sem-seg"):
        for a, b in zip(per32[task]["values"], per[task]["values"], strict=True):
            assert abs(a - b) <= 0.06, (task, a, b)
