"""Exactness of ablate / knockout / capture against clean runs and hand-written references.

Each test can fail if its mechanism is wrong: references are computed here
from the model's own weights with an explicit additive mask, not through the
code under test.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers_models import build
from PIL import Image

from vislens.interventions import ablate, capture, knockout, mean_image_embedding, set_inner
from vislens.models.vlm import VLM

ALL = ["llava", "llava_next", "llava_onevision", "qwen2_5_vl"]
SIZES = {"llava": [(120, 90), (60, 100)], "llava_next": [(200, 120), (100, 140)],
         "llava_onevision": [(200, 120), (100, 140)], "qwen2_5_vl": [(150, 90), (80, 120)]}
PROMPTS = ["describe this image .", "is there a red circle in this image ?"]


def make(family: str, attn: str = "sdpa") -> VLM:
    model, proc = build(family, attn=attn)
    return VLM(model, proc, family)


@pytest.fixture(scope="module", params=ALL)
def case(request):
    vlm = make(request.param)
    images = [Image.new("RGB", s, (40 * i + 30, 200, 90)) for i, s in
              enumerate(SIZES[request.param])]
    batch = vlm.prepare(images, PROMPTS)
    with torch.no_grad():
        clean = vlm.forward(batch).logits
    return vlm, batch, clean


def real(batch) -> torch.Tensor:
    return batch.attention_mask.bool()


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_empty_interventions_equal_clean(case):
    vlm, batch, clean = case
    empty = [[] for _ in range(batch.size)]
    with ablate(vlm, empty, "zeros"), knockout(vlm, [([], [])] * batch.size), \
            capture(vlm, empty, keys=True, values=True):
        out = vlm.forward(batch).logits
    close(out, clean, atol=1e-6)


def test_ablating_with_own_embeddings_is_clean(case):
    vlm, batch, clean = case
    feats = vlm.image_embeddings(batch)
    tm = batch.token_map
    positions, values = [], []
    for b in range(batch.size):
        cols = np.sort(np.concatenate([tm.image_positions(b), tm.newline_positions(b)]))
        pick = np.arange(0, len(cols), 3)
        positions.append(cols[pick])
        values.append(feats[b][torch.as_tensor(pick)])
    with ablate(vlm, positions, values):
        out = vlm.forward(batch).logits
    close(out[real(batch)], clean[real(batch)], atol=1e-5)


def test_zero_ablation_acts_exactly_from_its_positions(case):
    vlm, batch, clean = case
    tm = batch.token_map
    positions = [tm.image_positions(b)[5:40] for b in range(batch.size)]
    with ablate(vlm, positions, "zeros"):
        out = vlm.forward(batch).logits
    for b in range(batch.size):
        first = int(positions[b][0])
        keep = real(batch)[b, :first]
        close(out[b, :first][keep], clean[b, :first][keep], atol=1e-5)  # causal: untouched
        assert (out[b, first:] - clean[b, first:]).abs().max() > 1e-4


def test_logit_lens_last_layer_is_the_logits(case):
    vlm, batch, clean = case
    cols = [np.arange(batch.seq_len - 6, batch.seq_len)] * batch.size
    with capture(vlm, cols, layers=[vlm.num_layers - 1]) as cap, torch.no_grad():
        vlm.forward(batch)
    assert set(cap.residual) == {vlm.num_layers - 1, vlm.num_layers}
    logits = vlm.unembed(cap.residual[vlm.num_layers])
    close(logits, clean[cap.rows[:, 0], cap.rows[:, 1]], atol=1e-5)


# ---- hand-written reference ------------------------------------------------------------------
def position_ids(vlm, batch):
    if vlm.model_type == "qwen2_5_vl":
        pos, _ = vlm.model.model.get_rope_index(
            batch.input_ids, image_grid_thw=batch.inputs["image_grid_thw"],
            attention_mask=batch.attention_mask,
            mm_token_type_ids=batch.inputs["mm_token_type_ids"])
        return pos
    return (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding skipped


def rope_fn(vlm):
    attn = vlm.layers[0].self_attn
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


@torch.no_grad()
def reference_logits(vlm, batch, blocked: dict[int, torch.Tensor]) -> torch.Tensor:
    """softmax(QK^T * scale + additive mask) V, layer by layer, from the model's weights."""
    B, S = batch.size, batch.seq_len
    with capture(vlm, [np.arange(S)] * B, layers=[0]) as cap:
        vlm.forward(batch)
    h = cap.residual[0].view(B, S, -1)
    lm = vlm.language_model
    cos, sin = lm.rotary_emb(h, position_ids(vlm, batch))
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool))[None] & real(batch)[:, None, :]
    allowed |= torch.eye(S, dtype=torch.bool)[None] & ~real(batch)[:, :, None]  # pad rows: self
    for idx, layer in enumerate(vlm.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        hd = attn.head_dim
        q = attn.q_proj(x).view(B, S, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(B, S, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, S, -1, hd).transpose(1, 2)
        q, k = rope_fn(vlm)(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        mask = torch.zeros(B, S, S).masked_fill(~allowed, float("-inf"))
        if idx in blocked:
            mask = mask.masked_fill(blocked[idx], float("-inf"))
        scores = q @ k.transpose(-1, -2) * attn.scaling + mask[:, None]
        o = (torch.softmax(scores.float(), -1) @ v).transpose(1, 2).reshape(B, S, -1)
        h = h + attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return vlm.unembed(h)


def random_edges(batch, rng, layers):
    S = batch.seq_len
    edges, blocked = [], torch.zeros(batch.size, S, S, dtype=torch.bool)
    tm = batch.token_map
    for b in range(batch.size):
        first = int(np.flatnonzero(batch.attention_mask[b].numpy())[0])
        img = tm.image_positions(b)
        q = rng.choice(np.arange(img[0], S), size=12, replace=False)
        k = rng.choice(np.arange(first + 1, S), size=min(60, S - first - 2), replace=False)
        k2 = rng.choice(img, size=len(img) // 2, replace=False)
        edges.append([(q, k), ("last", k2)])
        blocked[b, q[:, None], k[None, :]] = True
        blocked[b, S - 1, k2] = True
    blocked &= torch.tril(torch.ones(S, S, dtype=torch.bool))[None]
    return edges, {layer: blocked for layer in layers}


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("inner", ["sdpa", "eager"])
def test_knockout_matches_handwritten_eager(family, inner):
    vlm = make(family)
    set_inner(vlm, inner)
    images = [Image.new("RGB", s, (200, 40 * i, 90)) for i, s in enumerate(SIZES[family])]
    batch = vlm.prepare(images, PROMPTS)
    rng = np.random.default_rng(0)
    clean = reference_logits(vlm, batch, {})
    for layers in ([0], [0, 1]):
        edges, blocked = random_edges(batch, rng, layers)
        with knockout(vlm, edges, layers=layers) as ko, torch.no_grad():
            out = vlm.forward(batch).logits
        assert ko.applied == len(layers)
        ref = reference_logits(vlm, batch, blocked)
        close(out[real(batch)], ref[real(batch)], atol=2e-5)
        assert (ref[:, -1] - clean[:, -1]).abs().max() > 1e-4  # the edges mattered


def test_captured_keys_rope_and_attention_rows(case):
    vlm, batch, clean = case
    tm = batch.token_map
    cols = [np.concatenate([tm.image_positions(b)[:7], [batch.seq_len - 1]])
            for b in range(batch.size)]
    queries = [[batch.seq_len - 1, batch.seq_len - 2]] * batch.size
    edges = [("last", tm.image_positions(b)[::2]) for b in range(batch.size)]
    with knockout(vlm, edges, layers=[1]), capture(vlm, cols, keys=True, values=True,
                                                   attention_queries=queries) as cap:
        vlm.forward(batch)
    B, S = batch.size, batch.seq_len
    with capture(vlm, [np.arange(S)] * B, layers=[0]) as full:
        vlm.forward(batch)
    cos, sin = vlm.language_model.rotary_emb(full.residual[0].view(B, S, -1),
                                             position_ids(vlm, batch))
    for layer in range(vlm.num_layers):
        pre = cap.keys_pre[layer]  # [N, kv, d]
        c, s = cos[cap.rows[:, 0], cap.rows[:, 1]], sin[cap.rows[:, 0], cap.rows[:, 1]]
        q_dummy = torch.zeros_like(pre)
        _, post = rope_fn(vlm)(q_dummy[None].transpose(1, 2), pre[None].transpose(1, 2),
                               c[None], s[None])
        close(post[0].transpose(0, 1), cap.keys_post[layer], atol=1e-5)
        assert (cap.keys_post[layer] - pre).abs().max() > 1e-3  # RoPE did rotate
        att = cap.attention[layer]
        close(att.sum(-1), torch.ones_like(att.sum(-1)), atol=1e-5)
        last = np.flatnonzero(cap.attention_rows[:, 1] == S - 1)
        for n in last:
            b = cap.attention_rows[n, 0]
            blocked_cols = torch.as_tensor(tm.image_positions(b)[::2])
            value = att[n][:, blocked_cols]
            if layer == 1:
                assert value.abs().max() == 0
            else:
                assert value.min() > 0


def test_attention_rows_equal_eager_weights():
    vlm = make("llava")
    eager = make("llava", attn="eager")
    eager.model.load_state_dict(vlm.model.state_dict())
    batch = vlm.prepare([Image.new("RGB", s) for s in SIZES["llava"]], PROMPTS)
    queries = [[batch.seq_len - 1, batch.seq_len - 3]] * batch.size
    with capture(vlm, [[]] * batch.size, attention_queries=queries) as cap:
        vlm.forward(batch)
    with torch.no_grad():
        weights = eager.model(**batch.inputs, output_attentions=True).attentions
    for layer, w in enumerate(weights):
        expected = w[cap.attention_rows[:, 0], :, cap.attention_rows[:, 1]]
        close(cap.attention[layer], expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_generate_equals_stepwise_forward_under_interventions(family):
    """KV-cached generate with ablate+knockout == greedy full forwards with the same edges."""
    vlm = make(family)
    images = [Image.new("RGB", s, (200, 40 * i, 90)) for i, s in enumerate(SIZES[family])]
    batch = vlm.prepare(images, PROMPTS)
    tm = batch.token_map
    S, steps = batch.seq_len, 3
    keys = [tm.image_positions(b)[1::2] for b in range(batch.size)]
    abl = [tm.image_positions(b)[:20] for b in range(batch.size)]
    opts = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
                pad_token_id=vlm.tokenizer.pad_token_id)
    with ablate(vlm, abl, "zeros"), knockout(vlm, [("last", k) for k in keys], layers=[1]), \
            torch.no_grad():
        out = vlm.model.generate(**batch.model_inputs(), **opts)
    with torch.no_grad():
        clean = vlm.model.generate(**batch.model_inputs(), **opts)
    inputs = dict(batch.inputs)
    for t in range(steps):
        queries = np.arange(S - 1, S + t)
        with ablate(vlm, abl, "zeros"), knockout(vlm, [(queries, k) for k in keys], layers=[1]), \
                torch.no_grad():
            logits = vlm.model(**inputs, use_cache=False).logits[:, -1]
        close(out.logits[t], logits, atol=2e-5)
        assert (clean.logits[t] - logits).abs().max() > 1e-4  # the interventions acted
        nxt = out.sequences[:, S + t]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], nxt[:, None]], 1)
        inputs["attention_mask"] = torch.cat(
            [inputs["attention_mask"], torch.ones_like(nxt[:, None])], 1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(nxt[:, None])], 1)


def test_knockout_refuses_to_block_every_key():
    vlm = make("llava")
    batch = vlm.prepare([Image.new("RGB", (50, 50))], ["what"])
    S = batch.seq_len
    with knockout(vlm, [("last", np.arange(S))]), pytest.raises(ValueError, match="every key"):
        vlm.forward(batch)


def test_mean_embedding_cached_by_model_and_data(tmp_path):
    vlm = make("llava_next")
    images = [Image.new("RGB", (200, 120), (255, 0, 0)), Image.new("RGB", (90, 160), (0, 0, 255))]
    mean = mean_image_embedding(vlm, images, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    batch = vlm.prepare(images, ["describe this image ."] * 2)
    feats = vlm.image_embeddings(batch)
    rows = []
    for b, f in enumerate(feats):
        cols = np.sort(np.concatenate([batch.token_map.image_positions(b),
                                       batch.token_map.newline_positions(b)]))
        rows.append(f[torch.as_tensor(~np.isin(cols, batch.token_map.newline_positions(b)))])
    close(mean, torch.cat(rows).mean(0), atol=1e-5)
    files[0].write_bytes(b"")  # a second call must read the cache, not recompute
    with pytest.raises(Exception):  # noqa: B017 - torch.load of an empty file
        mean_image_embedding(vlm, images, cache_dir=tmp_path)
    mean_image_embedding(vlm, images[:1], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_resume_from_cached_residual_equals_full_run(family):
    from vislens.interventions import residual_streams, start_at_layer

    vlm = make(family)
    images = [Image.new("RGB", s, (200, 40 * i, 90)) for i, s in enumerate(SIZES[family])]
    batch = vlm.prepare(images, PROMPTS)
    tm = batch.token_map
    edges = [("last", tm.image_positions(b)) for b in range(batch.size)]
    with torch.no_grad():
        clean = vlm.forward(batch).logits
        with knockout(vlm, edges, layers=[1]):
            full = vlm.forward(batch).logits
    cached = residual_streams(vlm, batch, [1])
    with start_at_layer(vlm, 1, cached[1]), torch.no_grad():
        close(vlm.forward(batch).logits[real(batch)], clean[real(batch)], atol=1e-5)
        with knockout(vlm, edges, layers=[1]):
            resumed = vlm.forward(batch).logits
    close(resumed[real(batch)], full[real(batch)], atol=1e-5)
    wrong = torch.zeros_like(cached[1])
    with start_at_layer(vlm, 1, wrong), torch.no_grad():
        assert (vlm.forward(batch).logits - clean).abs().max() > 1e-3  # the cache is what runs
    close(vlm.forward(batch).logits, clean, atol=1e-6)  # layers restored after the context


def test_capture_under_generate_keeps_each_step():
    vlm = make("qwen2_5_vl")
    batch = vlm.prepare([Image.new("RGB", s) for s in SIZES["qwen2_5_vl"]], PROMPTS)
    opts = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=vlm.tokenizer.pad_token_id)
    cols = [[batch.seq_len - 1]] * batch.size
    with capture(vlm, cols, generated=True) as cap, torch.no_grad():
        out = vlm.model.generate(**batch.model_inputs(), **opts)
    last = cap.generated[vlm.num_layers]
    assert last.shape[:2] == (batch.size, 3)
    for t in range(3):
        close(vlm.unembed(last[:, t]), out.logits[t], atol=1e-5)
    close(cap.residual[vlm.num_layers], last[:, 0], atol=1e-6)  # prefill row == step 0


def test_one_kind_of_key_is_all_that_is_gathered(case):
    vlm, batch, _ = case
    cols = [batch.token_map.image_positions(b)[:5] for b in range(batch.size)]
    with capture(vlm, cols, residual=False, keys=True, values=True) as both:
        vlm.forward(batch)
    for kind, kept, dropped in (("pre", "keys_pre", "keys_post"),
                                ("post", "keys_post", "keys_pre")):
        with capture(vlm, cols, residual=False, keys=kind, values=True) as one:
            vlm.forward(batch)
        assert not getattr(one, dropped) and len(getattr(one, kept)) == vlm.num_layers
        for layer in range(vlm.num_layers):
            assert torch.equal(getattr(one, kept)[layer], getattr(both, kept)[layer])
            assert torch.equal(one.values[layer], both.values[layer])
    with pytest.raises(ValueError, match="keys="):
        with capture(vlm, cols, keys="both"):
            pass
