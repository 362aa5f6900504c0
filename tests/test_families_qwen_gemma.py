"""Qwen2-VL, Qwen3-VL and Gemma 3: the look-alikes hold to the releases, and the
interventions are exact where these families differ from the paper's four.

- Qwen3-VL's DeepStack adds image features to the image positions of the LM's first
  layers: ablation replaces them at exactly the ablated positions (checked against the
  model run on hand-edited encoder outputs), and ablating every image token removes the
  image (identical logits for two images; on a fixture whose image reaches the LM only
  through DeepStack, answers fitted to the image go to chance).
- Gemma 3's image tokens attend bidirectionally within an image and its local layers
  through a sliding window: knockout (sdpa or eager inside) equals the model's own eager
  attention run on a mask written here from those rules plus the blocked pairs; capture's
  attention rows equal eager `output_attentions`; cached generation under a knockout
  equals full forwards once the sequence outgrows the sliding window (the cache then hands
  attention only the window's keys).
- mRoPE / RoPE positions: keys are the same alone and in a left-padded batch.

Geometry (the image-token map against what the processors really do) is tested in
test_models_geometry.py; every experiment through the CLI in
test_lookalikes_e2e.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from answer_head import States, fit_head
from lookalikes import GEMMA3, QWEN2VL, QWEN3VL, checkpoint_dir
from PIL import Image

import vislens
from vislens.interventions import (
    ablate,
    capture,
    knockout,
    mean_image_embedding,
    mean_injected_features,
    set_inner,
)
from vislens.models.vlm import VLM, ImageEmbeddings

pytestmark = pytest.mark.lookalike
NAMES = (QWEN2VL, QWEN3VL, GEMMA3)
FAMILY = {QWEN2VL: "qwen2_vl", QWEN3VL: "qwen3_vl", GEMMA3: "gemma3"}
MODEL_CLASS = {QWEN2VL: "Qwen2VLForConditionalGeneration",
               QWEN3VL: "Qwen3VLForConditionalGeneration",
               GEMMA3: "Gemma3ForConditionalGeneration"}
PROCESSOR_CLASS = {QWEN2VL: "Qwen2VLProcessor", QWEN3VL: "Qwen3VLProcessor",
                   GEMMA3: "Gemma3Processor"}
IMAGE_TOKEN_ID = {QWEN2VL: 151655, QWEN3VL: 151655, GEMMA3: 262144}
# 640x480: Qwen2-VL 476x644 -> 34x46 patches -> 17x23 tokens; Qwen3-VL 480x640 -> 30x40
# patches of 16 px -> 15x20; Gemma 3 16x16 pooled cells of the 896x896 image
IMAGE_TOKENS_640x480 = {QWEN2VL: 391, QWEN3VL: 300, GEMMA3: 256}
VOCAB = {QWEN2VL: 152064, QWEN3VL: 151936, GEMMA3: 262208}
EOS = {QWEN2VL: [151645, 151643], QWEN3VL: [151645, 151643], GEMMA3: [1, 106]}
CHAT = {
    QWEN2VL: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
             "<|im_start|>assistant\n",
    QWEN3VL: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?"
             "<|im_end|>\n<|im_start|>assistant\n",
    GEMMA3: "<bos><start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n"
            "<start_of_turn>model\n",
}


@pytest.fixture(scope="module")
def load():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = vislens.load(str(checkpoint_dir(name)))
        return cache[name]

    return get


def scene(w: int, h: int, color, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    px = np.full((h, w, 3), 40.0) + rng.normal(0, 8, (h, w, 1))
    px[h // 4:h // 2, w // 3:w // 2] = color
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


# ---- the look-alikes --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fixture_holds_to_the_release(name, load):
    """Classes, special ids, vocabulary, EOS, the chat format (Qwen3-VL without Qwen2's default
    system prompt; Gemma's BOS from the template, so the tokenizer adds none) and how many
    tokens a 640x480 image becomes."""
    path = checkpoint_dir(name)
    vlm = load(name)
    assert vlm.model_type == FAMILY[name] and type(vlm.model).__name__ == MODEL_CLASS[name]
    assert type(vlm.processor).__name__ == PROCESSOR_CLASS[name]
    assert vlm.image_token_id == IMAGE_TOKEN_ID[name]
    assert vlm.lm_head.weight.shape[0] == VOCAB[name]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == EOS[name]
    assert vlm.chat_text("What is this?") == CHAT[name]
    batch = vlm.prepare([Image.new("RGB", (640, 480))], ["What is this?"])
    ids = batch.input_ids[0].tolist()
    assert ids.count(vlm.image_token_id) == IMAGE_TOKENS_640x480[name] == len(batch.token_map)
    bos = vlm.tokenizer.bos_token_id
    assert (ids.count(bos) == 1 and ids[0] == bos) if name == GEMMA3 else bos is None
    if name == GEMMA3:  # the processor wraps every image in "\n\n" boi ... eoi "\n\n"
        tok = vlm.tokenizer
        first = ids.index(vlm.image_token_id)
        assert tok.convert_ids_to_tokens(ids[first - 1]) == "<start_of_image>"
        assert tok.convert_ids_to_tokens(ids[first + 256]) == "<end_of_image>"
        assert (tok.boi_token_id, tok.eoi_token_id, tok.image_token_id) == (255999, 256000,
                                                                            262144)
        assert vlm.tokenizer.tokenize("Derinkuyu is")[0][0] != "▁"  # no dummy prefix


@pytest.mark.parametrize("name", NAMES)
def test_keys_alone_equal_keys_in_a_left_padded_batch(name, load):
    """Post-RoPE keys and values of image and text positions: Qwen's mRoPE positions come
    from each row's grid and mask, Gemma's from vislens (counted from the first real token)."""
    vlm = load(name)
    images = [scene(200, 150, (220, 30, 30)), scene(90, 130, (30, 30, 220), seed=1)]
    prompts = ["Is there a giraffe in this image?", "What is this?"]
    batch = vlm.prepare(images, prompts)
    assert (batch.attention_mask == 0).any()

    def cols(b, one):
        tm = one.token_map
        return np.concatenate([tm.image_positions(b)[::7], [one.seq_len - 2, one.seq_len - 1]])

    with capture(vlm, [cols(b, batch) for b in range(2)], keys=True, values=True) as together:
        vlm.forward(batch, logits_to_keep=1)
    for b in range(2):
        one = vlm.prepare([images[b]], [prompts[b]])
        with capture(vlm, [cols(0, one)], keys=True, values=True) as alone:
            vlm.forward(one, logits_to_keep=1)
        for layer in range(vlm.num_layers):
            for table in ("keys_post", "values", "keys_pre"):
                close(together.of(table, layer, b), alone.of(table, layer, 0))


@pytest.mark.parametrize("name", [QWEN3VL, GEMMA3])
def test_pre_rope_keys_are_what_rope_rotates(name, load):
    """Both families normalise keys per head before RoPE (k_norm): keys-pre is that normed
    key, so rotating it by the position's angles gives exactly the key attention used."""
    import sys

    vlm = load(name)
    batch = vlm.prepare([scene(120, 90, (200, 40, 40)), scene(70, 90, (40, 200, 40))],
                        ["What is this?", "Is there a giraffe in this image?"])
    B, S = batch.size, batch.seq_len
    cols = [np.arange(S)] * B
    with capture(vlm, cols, keys=True) as cap:
        vlm.forward(batch, logits_to_keep=1)
    if name == GEMMA3:
        pos = (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    else:
        pos, _ = vlm.model.model.get_rope_index(
            batch.input_ids, mm_token_type_ids=batch.inputs["mm_token_type_ids"],
            image_grid_thw=batch.inputs["image_grid_thw"], attention_mask=batch.attention_mask)
    x = torch.zeros(B, S, vlm.config.text_config.hidden_size)
    real = batch.attention_mask.bool().flatten()
    for layer in range(vlm.num_layers):
        attn = vlm.layers[layer].self_attn
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        args = (vlm.config.text_config.layer_types[layer],) if name == GEMMA3 else ()
        cos, sin = vlm.language_model.rotary_emb(x, pos, *args)
        pre = cap.keys_pre[layer].view(B, S, -1, attn.head_dim).transpose(1, 2)
        _, post = rope(torch.zeros_like(pre), pre, cos, sin)
        post = post.transpose(1, 2).reshape(B * S, -1, attn.head_dim)
        close(post[real], cap.keys_post[layer][real])


def test_residual_is_what_each_layer_reads(load):
    """Residual l is the input of layer l: on Qwen3-VL it differs from layer l-1's output by
    the DeepStack features at the image positions, and by nothing elsewhere."""
    vlm = load(QWEN3VL)
    batch = vlm.prepare([scene(120, 90, (200, 40, 40))], ["What is this?"])
    feats = vlm.image_embeddings(batch)
    outputs = {}
    hooks = [layer.register_forward_hook(
        lambda m, a, o, i=i: outputs.__setitem__(i, (o[0] if isinstance(o, tuple) else o)))
        for i, layer in enumerate(vlm.layers)]
    try:
        with capture(vlm, [np.arange(batch.seq_len)]) as cap:
            vlm.forward(batch, image_features=feats, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    image = torch.as_tensor(batch.token_map.image_positions(0))
    for layer in range(1, vlm.num_layers):
        added = cap.residual[layer] - outputs[layer - 1][0]
        expected = torch.zeros_like(added)
        if layer - 1 < len(feats.injected[0]):
            expected[image] = feats.injected[0][layer - 1]
        close(added, expected)
    close(cap.residual[vlm.num_layers], outputs[vlm.num_layers - 1][0], atol=0)


# ---- Qwen3-VL: DeepStack ----------------------------------------------------------------------
def _features_without(feats: ImageEmbeddings, rows: list[np.ndarray]) -> ImageEmbeddings:
    """Encoder outputs edited by hand: image i's feature rows `rows[i]` zeroed, in the merged
    features and in every DeepStack layer (what a zero ablation of those tokens must be)."""
    per, injected = [], []
    for f, layers, r in zip(feats, feats.injected, rows, strict=True):
        idx = torch.as_tensor(r, dtype=torch.long)
        f = f.clone()
        f[idx] = 0
        per.append(f)
        layers = [x.clone() for x in layers]
        for x in layers:
            x[idx] = 0
        injected.append(layers)
    return ImageEmbeddings(per, injected)


@pytest.mark.slow
def test_deepstack_ablation_replaces_the_injected_rows_of_exactly_those_tokens(load):
    vlm = load(QWEN3VL)
    images = [scene(300, 200, (220, 30, 30)), scene(130, 170, (30, 200, 30), seed=2)]
    batch = vlm.prepare(images, ["What is this?", "Is there a giraffe in this image?"])
    tm = batch.token_map
    feats = vlm.image_embeddings(batch)
    assert feats.injected is not None and len(feats.injected[0]) == 3  # three injection layers
    rng = np.random.default_rng(0)
    picked = [np.sort(rng.choice(len(tm.image_positions(b)), 25, replace=False))
              for b in range(2)]
    positions = [tm.image_positions(b)[picked[b]] for b in range(2)]
    real = batch.attention_mask.bool()
    with torch.no_grad():
        clean = vlm.forward(batch).logits
        # own values back in: nothing changes, so every row went to its own position
        own = [feats[b][torch.as_tensor(picked[b])] for b in range(2)]
        own_injected = [[x[torch.as_tensor(picked[b])] for x in feats.injected[b]]
                        for b in range(2)]
        with ablate(vlm, positions, own, injected=own_injected) as ab:
            same = vlm.forward(batch).logits
        assert ab.injected_applied == 1
        close(same[real], clean[real])
        with ablate(vlm, positions, "zeros"):
            zeroed = vlm.forward(batch).logits
        reference = vlm.forward(batch, image_features=_features_without(feats, picked)).logits
        close(zeroed[real], reference[real])
        with ablate(vlm, positions, "zeros", injected="keep"):
            embeddings_only = vlm.forward(batch).logits
    assert (embeddings_only[:, -1] - zeroed[:, -1]).abs().max() > 1e-4  # the injection mattered
    with pytest.raises(ValueError, match="DeepStack"):
        with ablate(vlm, positions, feats[0].mean(0)):  # a mean vector, nothing said for injection
            pass


def _two_images(vlm):
    images = [scene(160, 120, (230, 40, 40)), scene(160, 120, (40, 40, 230))]
    return images, vlm.prepare(images, ["Is there a red square in this image?"] * 2)


def test_ablating_every_image_token_removes_the_image(load):
    """Two images of one size (so one mRoPE layout): with input embeddings alone ablated the
    logits still tell them apart (DeepStack carries them); ablated fully (zeros, or the
    reference means of both paths) the two runs are the same computation."""
    vlm = load(QWEN3VL)
    images, batch = _two_images(vlm)
    everything = [batch.token_map.image_positions(b) for b in range(2)]
    mean = mean_image_embedding(vlm, images)
    means = mean_injected_features(vlm, images)
    assert len(means) == 3 and mean_injected_features(load(QWEN2VL), images) == []
    with torch.no_grad():
        clean = vlm.forward(batch, logits_to_keep=1).logits[:, -1]
        with ablate(vlm, everything, "zeros", injected="keep"):
            embeddings_only = vlm.forward(batch, logits_to_keep=1).logits[:, -1]
        with ablate(vlm, everything, "zeros"):
            zeros = vlm.forward(batch, logits_to_keep=1).logits[:, -1]
        with ablate(vlm, everything, mean, injected=means):
            averaged = vlm.forward(batch, logits_to_keep=1).logits[:, -1]
    assert (clean[0] - clean[1]).abs().max() > 1e-3
    assert (embeddings_only[0] - embeddings_only[1]).abs().max() > 1e-3
    close(zeros[0], zeros[1], atol=1e-6)
    close(averaged[0], averaged[1], atol=1e-6)


def test_answers_carried_by_deepstack_go_to_chance(load):
    """A Qwen3-VL whose main projector is silenced, so the image reaches the LM only through
    DeepStack, with an unembedding fitted to say "Yes" for the red image and "No" for the
    blue one: embedding ablation of every image token leaves both answers right, the full
    ablation gives both images one answer (1 of 2 right: chance)."""
    vlm = vislens.load(str(checkpoint_dir(QWEN3VL)))
    merger = vlm.model.model.visual.merger.linear_fc2
    with torch.no_grad():
        merger.weight.zero_()
        merger.bias.zero_()
    images, batch = _two_images(vlm)
    assert all(float(f.abs().max()) == 0 for f in vlm.image_embeddings(batch))
    yes, no = (vlm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    last = vlm.num_layers
    with torch.no_grad(), capture(vlm, [[batch.seq_len - 1]] * 2, layers=[last - 1]) as cap:
        vlm.forward(batch, logits_to_keep=1)
    fit = fit_head(vlm, States(x=[cap.residual[last].float()], y=[yes, no], top=[1, 1]))
    with torch.no_grad():
        vlm.lm_head.weight.copy_(fit.weight)
    everything = [batch.token_map.image_positions(b) for b in range(2)]

    def answers(**kwargs):
        if not kwargs:
            return vlm.generate(batch, max_new_tokens=1)[:, 0].tolist()
        with ablate(vlm, everything, "zeros", **kwargs):
            return vlm.generate(batch, max_new_tokens=1)[:, 0].tolist()

    assert answers() == [yes, no]
    assert answers(injected="keep") == [yes, no]  # input embeddings carry nothing here
    full = answers(injected="zeros")
    assert full[0] == full[1] and sum(a == b for a, b in zip(full, [yes, no])) == 1


def test_integrated_gradients_follow_the_injected_features_too(load):
    """IG from the full ablation baseline (mean embeddings AND mean injected features) is
    complete: attributions add up to logit(clean) - logit(every image token ablated)."""
    from vislens.experiments import ablation

    vlm = load(QWEN3VL)
    images, batch = _two_images(vlm)
    one = vlm.prepare([images[0]], ["Is there a red square in this image?"])
    feats = vlm.image_embeddings(one)
    mean, means = mean_image_embedding(vlm, images), mean_injected_features(vlm, images)
    target = int(one.input_ids[0, 5])
    attr = ablation.integrated_gradients(vlm, one, feats, target, mean, steps=8, injected=means)
    everything = [one.token_map.image_positions(0)]
    with torch.no_grad():
        clean = vlm.forward(one, logits_to_keep=1).logits[0, -1, target]
        with ablate(vlm, everything, mean, injected=means):
            base = vlm.forward(one, logits_to_keep=1).logits[0, -1, target]
        with ablate(vlm, everything, mean, injected="keep"):
            embeddings_only = vlm.forward(one, logits_to_keep=1).logits[0, -1, target]
    delta, partial = float(clean - base), float(clean - embeddings_only)
    assert attr.shape == (len(everything[0]),)
    tolerance = 0.05 * abs(delta) + 1e-4
    assert abs(attr.sum() - delta) <= tolerance
    # an IG that left the injected features clean would add up to `partial`: out of tolerance
    assert abs(partial - delta) > tolerance


def test_generate_with_cached_features_keeps_the_injection(load):
    """image_features reuse (one vision pass for many conditions) hands DeepStack its
    features back: the same logits as a run from pixels; a plain list is refused."""
    vlm = load(QWEN3VL)
    _, batch = _two_images(vlm)
    with torch.no_grad():
        fresh = vlm.forward(batch, logits_to_keep=1).logits
        feats = vlm.image_embeddings(batch)
        cached = vlm.forward(batch, image_features=feats, logits_to_keep=1).logits
    close(cached, fresh, atol=1e-6)
    twice = feats * 2
    assert isinstance(twice, ImageEmbeddings) and len(twice.injected) == 4
    with pytest.raises(ValueError, match="injects"):
        vlm.forward(batch, image_features=list(feats))


# ---- Gemma 3: bidirectional image blocks, sliding window ---------------------------------------
WINDOW = 48  # shorter than an image (256 tokens): the window cuts through image blocks


@pytest.fixture(scope="module")
def gemma():
    """The look-alike (sdpa) and the same weights with eager attention, both with a sliding
    window shorter than an image, a left-padded batch of one and of two images, and its
    image features (one vision pass for every run below)."""
    path = checkpoint_dir(GEMMA3)
    vlm = vislens.load(str(path))
    eager = vislens.load(str(path))
    eager.model.set_attn_implementation("eager")
    for m in (vlm, eager):
        m.config.text_config.sliding_window = WINDOW
    images = [[scene(120, 90, (200, 40, 40))],
              [scene(80, 100, (40, 200, 40), seed=3), scene(100, 80, (40, 40, 200), seed=4)]]
    batch = vlm.prepare(images, ["Is there a red square in this image?", "What is this?"])
    return vlm, eager, batch, vlm.image_embeddings(batch)


def gemma_allowed(vlm, batch) -> dict[str, torch.Tensor]:
    """Per layer type, [B, S, S] pairs a query may attend to, from Gemma 3's rules: causal, or
    both in one image (a run of image tokens); padding never; local layers also only the
    last WINDOW columns before a query (and every later column of its own image)."""
    ids, real = batch.input_ids, batch.attention_mask.bool()
    S = ids.shape[1]
    q, k = torch.arange(S)[:, None], torch.arange(S)[None, :]
    image = ids == vlm.image_token_id
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    block = torch.where(image, starts.long().cumsum(1), -1)
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    full = ((k <= q)[None] | same) & real[:, None, :]
    return {"full_attention": full, "sliding_attention": full & (k > q - WINDOW)[None]}


def gemma_reference(vlm, eager, batch, feats, blocked: dict[int, torch.Tensor],
                    attentions=False):
    """The model's own eager layers on a mask written from the rules, with `blocked` pairs
    removed per layer (layer 0 is the local layer, layer 1 the global one): the final
    (normed) hidden states, and the attention weights when asked."""
    allowed = gemma_allowed(vlm, batch)
    types = vlm.config.text_config.layer_types
    masks = {}
    for layer, kind in enumerate(types):
        ok = allowed[kind] & ~blocked.get(layer, torch.zeros_like(allowed[kind]))
        masks[kind] = torch.where(ok, 0.0, torch.finfo(torch.float32).min)[:, None]
    pos = (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = eager.model.model(input_ids=batch.input_ids, attention_mask=masks,
                                position_ids=pos, output_attentions=attentions,
                                mm_encoder_outputs={"image": feats.encoder_output()},
                                use_cache=False)
    return out.last_hidden_state, out.attentions


def final_hidden(vlm, batch, feats) -> torch.Tensor:
    """vislens' run of the batch: the final normed hidden state of every position (what the
    logits are made from, without a 262k-wide unembedding per position)."""
    cols = [np.arange(batch.seq_len)] * batch.size
    with torch.no_grad(), capture(vlm, cols, layers=[vlm.num_layers - 1]) as cap:
        vlm.forward(batch, image_features=feats, logits_to_keep=1)
        return vlm.final_norm(cap.residual[vlm.num_layers]).view(batch.size, batch.seq_len, -1)


def random_pairs(vlm, batch, rng):
    """Edges of every kind: image -> image both ways inside one image (bidirectional pairs),
    text -> image, image -> text, and the last position -> image."""
    S = batch.seq_len
    tm = batch.token_map
    edges, blocked = [], torch.zeros(batch.size, S, S, dtype=torch.bool)
    for b in range(batch.size):
        img = tm.image_positions(b)
        first = int(np.flatnonzero(batch.attention_mask[b].numpy())[0])
        text = np.setdiff1d(np.arange(first + 1, S), img)
        q = np.concatenate([rng.choice(img, 10, replace=False), rng.choice(text, 6, replace=False)])
        k = np.concatenate([rng.choice(img, 40, replace=False), rng.choice(text, 5, replace=False)])
        k2 = rng.choice(img, 30, replace=False)
        edges.append([(q, k), ("last", k2)])
        blocked[b, q[:, None], k[None, :]] = True
        blocked[b, S - 1, k2] = True
    return edges, blocked


def test_gemma_mask_rules_are_the_models(gemma):
    """The rules written above are what transformers builds: the clean sdpa run equals the
    eager run on the hand-written mask (so the references below test knockout, not them)."""
    vlm, eager, batch, feats = gemma
    real = batch.attention_mask.bool()
    clean = final_hidden(vlm, batch, feats)
    close(gemma_reference(vlm, eager, batch, feats, {})[0][real], clean[real])
    bidirectional = gemma_allowed(vlm, batch)["full_attention"] & \
        ~torch.tril(torch.ones(batch.seq_len, batch.seq_len, dtype=torch.bool))
    assert bidirectional.any()  # image tokens do see later tokens of their image


@pytest.mark.parametrize("inner", ["sdpa", "eager"])
def test_gemma_knockout_equals_eager_reference(gemma, inner):
    vlm, eager, batch, feats = gemma
    set_inner(vlm, inner)
    real = batch.attention_mask.bool()
    rng = np.random.default_rng(0)
    try:
        clean = final_hidden(vlm, batch, feats)
        with knockout(vlm, [([], [])] * batch.size):
            close(final_hidden(vlm, batch, feats), clean, atol=1e-6)  # empty == clean
        for layers in ([0], [1], [0, 1]):
            edges, blocked = random_pairs(vlm, batch, rng)
            with knockout(vlm, edges, layers=layers) as ko:
                out = final_hidden(vlm, batch, feats)
            assert ko.applied == len(layers)
            ref, _ = gemma_reference(vlm, eager, batch, feats, {x: blocked for x in layers})
            close(out[real], ref[real], atol=2e-5)
            assert (ref[:, -1] - clean[:, -1]).abs().max() > 1e-4  # the edges mattered
    finally:
        set_inner(vlm, "sdpa")


def test_gemma_attention_rows_equal_eager_weights_under_knockout(gemma):
    """Captured rows of image and text queries (post-softmax, knockout included) equal eager
    output_attentions on the same mask: blocked pairs exactly zero, the bidirectional pairs
    left unblocked still attended."""
    vlm, eager, batch, feats = gemma
    rng = np.random.default_rng(1)
    edges, blocked = random_pairs(vlm, batch, rng)
    tm = batch.token_map
    S = batch.seq_len
    queries = [np.concatenate([tm.image_positions(b)[[0, 5, 100]], [S - 3, S - 1]])
               for b in range(batch.size)]
    with knockout(vlm, edges, layers=[0, 1]), capture(vlm, [[]] * batch.size,
                                                      attention_queries=queries) as cap:
        vlm.forward(batch, image_features=feats, logits_to_keep=1)
    _, weights = gemma_reference(vlm, eager, batch, feats, {0: blocked, 1: blocked},
                                 attentions=True)
    allowed = gemma_allowed(vlm, batch)
    types = vlm.config.text_config.layer_types
    rows = cap.attention_rows
    for layer, w in enumerate(weights):
        got = cap.attention[layer]
        close(got, w[rows[:, 0], :, rows[:, 1]], atol=1e-5)
        ok = allowed[types[layer]][rows[:, 0], rows[:, 1]] & ~blocked[rows[:, 0], rows[:, 1]]
        assert (got.permute(1, 0, 2)[:, ~ok] == 0).all()
        later = ok & (torch.arange(S)[None] > torch.as_tensor(rows[:, 1])[:, None])
        assert later.any() and (got.permute(1, 0, 2)[:, later] > 0).all()


def test_gemma_generate_past_the_sliding_window_under_knockout(gemma):
    """Cached greedy decoding under a knockout of the last position's keys equals full forwards
    with the same edges: past the window the local layer's cache hands attention only its
    window's keys, and knockout places its columns by the tokens seen."""
    vlm, _, batch, feats = gemma
    S, steps = batch.seq_len, 3
    assert S > WINDOW
    keys = [np.concatenate([batch.token_map.image_positions(b)[-20:], [S - 30, S - 5]])
            for b in range(batch.size)]
    opts = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=vlm.tokenizer.pad_token_id)
    with knockout(vlm, [("last", k) for k in keys]), torch.no_grad():
        out = vlm.model.generate(**batch.model_inputs(feats), **opts)
    inputs = batch.model_inputs(feats)
    for t in range(steps):
        queries = np.arange(S - 1, S + t)
        pos = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
        with knockout(vlm, [(queries, k) for k in keys]), torch.no_grad():
            logits = vlm.model(**inputs, position_ids=pos, use_cache=False,
                               logits_to_keep=1).logits[:, -1]
        close(out.logits[t], logits, atol=2e-5)
        nxt = out.sequences[:, S + t]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], nxt[:, None]], 1)
        for key in ("attention_mask", "token_type_ids"):
            fill = torch.ones_like(nxt[:, None]) if key == "attention_mask" else \
                torch.zeros_like(nxt[:, None])
            inputs[key] = torch.cat([inputs[key], fill], 1)


@pytest.mark.slow
def test_gemma_pan_and_scan_saved_in_the_image_processor_is_honoured():
    """A preprocessor_config.json that turns pan-and-scan on is obeyed (the processor's class
    default would switch it off on every call), and the crops become tiles of the map."""
    from helpers_geometry import pan_and_scan

    vlm = vislens.load(str(checkpoint_dir(GEMMA3)))
    proc = pan_and_scan(vlm.processor)
    with_pas = VLM(vlm.model, proc, "gemma3")
    batch = with_pas.prepare([Image.new("RGB", (1100, 300))], ["What is this?"])
    tm = batch.token_map
    assert len(tm) == 5 * 256 and sorted(tm.grids[0]) == [0, 1, 2, 3, 4]
    assert "pan-and-scan crops" in with_pas.native_image_size()
    assert "Here is the original image" in vlm.tokenizer.decode(batch.input_ids[0])
    feats = with_pas.image_embeddings(batch)
    assert len(feats) == 1 and feats[0].shape[0] == 5 * 256  # one image, five views
    with torch.no_grad():
        close(with_pas.forward(batch, image_features=feats, logits_to_keep=1).logits,
              with_pas.forward(batch, logits_to_keep=1).logits, atol=1e-6)
