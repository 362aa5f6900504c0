"""The knockout sweep's resume-from-cached-residual path gives the numbers of full runs."""

import numpy as np
import pytest
import torch

from vislens.data import shapesworld
from vislens.experiments import knockout
from vislens.interventions import knockout as knock
from vislens.models.vlm import VLM
from vislens.toy.build import build_model, build_processor


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(build_model(seed=5).eval(), build_processor(), "llava", name="untrained")


def test_resumed_sweep_equals_one_full_forward_per_condition(vlm):
    sample = shapesworld.generate(1, seed=4)[0]
    one = vlm.prepare([sample.image], ["is there a red circle in this image ?"])
    feats = vlm.image_embeddings(one)
    edges = knockout.edge_sets(one.token_map, one, 0, sample.instances[0].mask)
    windows = [(0, 1), (1, 2), (2, 3), (0, 3)]
    grid = [(c, w) for c in ("object+1->last", "image->question", "image-but-object+1->last")
            for w in range(len(windows))]
    clean, cached = knockout.clean_pass(vlm, one, feats, [s for s, _ in windows])
    full = vlm.forward(one, logits_to_keep=1).logits[0, -1].float()
    torch.testing.assert_close(clean[0, -1], torch.softmax(full, -1))
    got = knockout.sweep(vlm, one, feats, edges, grid, windows, cached)
    moved = 0.0
    for i, (c, w) in enumerate(grid):
        start, end = windows[w]
        with knock(vlm, [edges[c]], range(start, end + 1)):
            alone = vlm.forward(one, logits_to_keep=1).logits[0, -1].float()
        torch.testing.assert_close(got[i, -1], torch.softmax(alone, -1), rtol=1e-4, atol=1e-6)
        moved = max(moved, float((got[i] - clean[0]).abs().max()))
    assert moved > 1e-4  # the knockouts really changed the answer distribution


def test_resume_uses_the_cache_it_is_given(vlm):
    """A wrong cached residual must change the result: layers below the start are skipped."""
    sample = shapesworld.generate(1, seed=4)[0]
    one = vlm.prepare([sample.image], ["is there a red circle in this image ?"])
    feats = vlm.image_embeddings(one)
    edges = knockout.edge_sets(one.token_map, one, 0, sample.instances[0].mask)
    windows = [(2, 3)]
    grid = [("object+1->last", 0)]
    _, cached = knockout.clean_pass(vlm, one, feats, [2])
    good = knockout.sweep(vlm, one, feats, edges, grid, windows, cached)
    cached.residual[2] = cached.residual[2] * 0.5
    bad = knockout.sweep(vlm, one, feats, edges, grid, windows, cached)
    assert not torch.allclose(good, bad)
    assert np.isfinite(good.numpy()).all()
