"""A model spread over devices by accelerate computes exactly what it computes on one:
every intervention moves what it adds to the device of the tensor it meets. On this
CPU-only machine the spread is CPU + disk offload (accelerate moves weights and
activations between modules with the same hooks it uses across GPUs)."""

import numpy as np
import pytest
import torch
from lookalikes import LLAVA15, checkpoint_dir
from PIL import Image

import vislens
from vislens.experiments import ablation
from vislens.interventions import LAST, ablate, capture, knockout

pytestmark = pytest.mark.lookalike


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = checkpoint_dir(LLAVA15)
    plain = vislens.load(str(path))
    lm = "model.language_model"
    spread = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
              f"{lm}.embed_tokens": "cpu", f"{lm}.layers.0": "cpu", f"{lm}.layers.1": "disk",
              f"{lm}.norm": "cpu", f"{lm}.rotary_emb": "cpu", "lm_head": "disk"}
    mapped = vislens.load(str(path), device_map=spread,
                          offload_folder=tmp_path_factory.mktemp("offload"))
    assert mapped.model.model.language_model.layers[1].mlp.up_proj.weight.device.type == "meta"
    return plain, mapped


def _batch(vlm):
    images = [Image.new("RGB", (640, 480), (200, 30, 30)), Image.new("RGB", (300, 400))]
    return vlm.prepare(images, ["What is this?", "Is there a giraffe in this image?"])


@torch.no_grad()
def test_forward_capture_knockout_and_ablation_match_one_device(pair):
    plain, mapped = pair
    results = []
    for vlm in (plain, mapped):
        batch = _batch(vlm)
        tm = batch.token_map
        image = [tm.image_positions(b) for b in range(2)]
        got = {"clean": vlm.forward(batch, logits_to_keep=1).logits}
        with capture(vlm, [p[:40] for p in image], keys=True, values=True) as cap:
            vlm.forward(batch, logits_to_keep=1)
        got["keys"], got["values"] = cap.keys_post[1], cap.values[1]
        got["residual"] = cap.residual[vlm.num_layers]
        got["lens"] = vlm.unembed(cap.residual[vlm.num_layers][:5])
        with knockout(vlm, [(LAST, p[::3]) for p in image], layers=[1]):
            got["knockout"] = vlm.forward(batch, logits_to_keep=1).logits
        with ablate(vlm, [p[:100] for p in image], "zeros"):
            got["ablated"] = vlm.forward(batch, logits_to_keep=1).logits
            got["generated"] = vlm.generate(batch, max_new_tokens=3)
        results.append(got)
    for key in results[0]:
        a, b = (r[key].cpu() for r in results)
        if key == "generated":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=key)
    assert not torch.allclose(results[1]["clean"], results[1]["knockout"])


def test_integrated_gradients_match_one_device(pair):
    out = []
    for vlm in pair:
        one = vlm.prepare([Image.new("RGB", (640, 480), (20, 200, 30))], ["What is this?"])
        feats = vlm.image_embeddings(one)
        out.append(ablation.integrated_gradients(vlm, one, feats, 5, "zeros", steps=4))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-4, atol=1e-6)
