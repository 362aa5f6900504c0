"""Idefics3 / SmolVLM, InternVL, Mistral 3 and PaliGemma against what transformers does.

On the look-alikes of tests/lookalikes/ (real processors and settings, random
weights): token counts and tile grids are the processors' own, markers are kept
apart from patches and prompt, features are what the model packs, keys are the
same alone and in a left-padded batch; PaliGemma's prefix LM composes exactly with
knockout (a reference written here from the weights, with the bidirectional prefix
mask), and its captured attention rows are `output_attentions` of the model. The
probe-image test of every token's box is in test_models_geometry.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from lookalikes import FAMILY, INTERNVL, MISTRAL3, PALIGEMMA, SMOLVLM, checkpoint_dir
from PIL import Image

import vislens
from vislens.experiments import knockout as knockout_experiment
from vislens.experiments.batching import extend_batch
from vislens.interventions import ablate, capture, knockout
from vislens.interventions.vision import record_projector, vision_rows
from vislens.models.vlm import VLM

NAMES = (SMOLVLM, INTERNVL, MISTRAL3, PALIGEMMA)
# every test loads a look-alike (but test_family_declarations, which reads the registry)
pytestmark = pytest.mark.lookalike
SIZES = [(640, 480), (200, 640), (1000, 250), (40, 30)]
PROMPTS = ["Describe this image.", "Is there a red circle in this image?"]


def final_states(vlm, batch, **kwargs) -> torch.Tensor:
    """The last layer's output at every column: what the logits are made of, without a
    [batch, sequence, vocabulary] tensor (5 GB for InternVL's 151k x two 3k-token rows)."""
    cols = [np.arange(batch.seq_len)] * batch.size
    with torch.no_grad(), capture(vlm, cols, layers=[vlm.num_layers - 1]) as cap:
        vlm.forward(batch, logits_to_keep=1, **kwargs)
    return cap.residual[vlm.num_layers].view(batch.size, batch.seq_len, -1)


# SmolVLM and InternVL (1053 / 3328 image tokens at 640x480: over a second a test) run in the
# full run only; Mistral 3 and PaliGemma in the everyday loop too
@pytest.fixture(scope="module", params=[pytest.param(SMOLVLM, marks=pytest.mark.slow),
                                        pytest.param(INTERNVL, marks=pytest.mark.slow),
                                        MISTRAL3, PALIGEMMA])
def lookalike(request):
    return request.param, vislens.load(str(checkpoint_dir(request.param)))


def expected_counts(name: str, vlm, w: int, h: int) -> tuple[int, int]:
    """(patch tokens, marker tokens) of one image, from the processors' documented
    behaviour: public tile counts and the sizes they return, never a private helper
    (`_get_num_multimodal_tokens` changed meaning in transformers 5.25)."""
    proc, ip = vlm.processor, vlm.processor.image_processor
    if name == SMOLVLM:
        n, rows, cols = ip.get_number_of_image_patches(h, w, {})
        tiles = max(n, 1)
        return tiles * proc.image_seq_len, None  # markers: checked by their ids below
    if name == INTERNVL:
        from vislens.models.families.internvl import tiling

        tiles = ip.get_number_of_image_patches(h, w, tiling(proc))
        return tiles * proc.image_seq_length, 2  # one <img> before, one </img> after
    if name == MISTRAL3:
        # image_sizes is the resized image the processor returns; each 28-px row of
        # cells ends in [IMG_BREAK], the last one in [IMG_END]
        hh, ww = vlm.prepare([Image.new("RGB", (w, h))], ["x"]).inputs["image_sizes"][0]
        cell = ip.patch_size["height"] * proc.spatial_merge_size \
            if isinstance(ip.patch_size, dict) else ip.patch_size * proc.spatial_merge_size
        rows, cols = int(hh) // cell, int(ww) // cell
        return rows * cols, rows
    return proc.image_seq_length, 0


def test_token_counts_and_markers_are_the_processors(lookalike):
    name, vlm = lookalike
    images = [Image.new("RGB", s, (90, 20, 30)) for s in SIZES]
    batch = vlm.prepare(images, ["describe this image ."] * len(images))
    tm = batch.token_map
    ids = batch.input_ids.numpy()
    tok = vlm.tokenizer
    for b, (w, h) in enumerate(SIZES):
        patches, markers = expected_counts(name, vlm, w, h)
        assert len(tm.image_positions(b)) == patches == int((ids[b] == vlm.image_token_id).sum())
        marks = tm.marker_positions(b)
        assert not np.isin(marks, tm.image_positions(b)).any()
        if markers is not None:
            assert len(marks) == markers
        words = set(tok.convert_ids_to_tokens(ids[b][marks].tolist()))
        if name == INTERNVL:
            assert words == {"<img>", "</img>"}
        elif name == MISTRAL3:
            assert words <= {"[IMG_BREAK]", "[IMG_END]"} and ids[b][marks[-1]] == \
                tok.convert_tokens_to_ids("[IMG_END]")
        elif name == SMOLVLM:
            n, rows, cols = vlm.processor.image_processor.get_number_of_image_patches(h, w, {})
            fake = tok.convert_tokens_to_ids("<fake_token_around_image>")
            assert int((ids[b][marks] == fake).sum()) == rows * cols + 2
            text = tok.decode(ids[b][marks[0]:marks[-1] + 1])
            assert f"<row_{rows}_col_{cols}>" in text if rows else "<row_" not in text
            assert text.count("<global-img>") == 1
        # everything between the first and last marker is patch or marker, nothing else
        span = np.arange(min(marks.min(initial=10**9), tm.image_positions(b).min()),
                         tm.image_end(b) + 1)
        assert np.array_equal(np.sort(np.concatenate([marks, tm.image_positions(b)])), span)


def test_tile_grids_are_transformers_choice(lookalike):
    """Crops (tile 1) stitched in the grid the processor picks, the global view or thumbnail
    (tile 0) read last."""
    name, vlm = lookalike
    if name not in (SMOLVLM, INTERNVL):
        pytest.skip("tiling families only")
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas,
    )

    for w, h in SIZES:
        tm = vlm.prepare([Image.new("RGB", (w, h))], ["what"]).token_map
        if name == SMOLVLM:
            _, rows, cols = vlm.processor.image_processor.get_number_of_image_patches(h, w, {})
            n = 9
        else:
            cols, rows = get_optimal_tiled_canvas((h, w), (448, 448), 1, 12)
            rows, cols = (rows, cols) if rows * cols > 1 else (0, 0)
            n = 16
        assert tm.grids[0][0] == (n, n)
        if rows:
            assert tm.grids[0][1] == (rows * n, cols * n)
            assert tm.crop[tm.tile == 1].max() == rows * cols
        assert tm.tile[np.argmax(tm.position)] == 0  # the global view comes last
        last = tm.last_row(0)
        assert set(tm.row[np.isin(tm.position, last)]) == {n - 1}
        assert set(tm.tile[np.isin(tm.position, last)]) == {0}


def test_features_are_what_the_model_packs(lookalike):
    """One feature row per image token of each sample; the vision rows recorded at the
    projector are copies matched to every image token (the baseline's pairing)."""
    name, vlm = lookalike
    images = [Image.new("RGB", s, (30 * i, 100, 200)) for i, s in enumerate(SIZES[:2])]
    batch = vlm.prepare(images, PROMPTS)
    rows = torch.cat([f.reshape(-1, f.shape[-1]) for f in vlm.image_embeddings(batch)])
    counts = [len(batch.token_map.image_positions(b)) for b in range(2)]
    assert len(rows) == sum(counts)
    clean = final_states(vlm, batch)
    batch.features = None
    with record_projector(vlm) as rec:
        again = final_states(vlm, batch)
    torch.testing.assert_close(clean, again, rtol=0, atol=1e-5)  # cached features == fresh
    vision = vision_rows(rows, rec)
    assert len(vision) == len(rows) and torch.isfinite(vision).all()


@pytest.mark.slow
def test_keys_alone_equal_keys_in_a_left_padded_batch(lookalike):
    """Post-RoPE keys of image and text positions, alone and left-padded together: the
    positions vislens passes (or the model derives) count from each row's first token."""
    name, vlm = lookalike
    images = [Image.new("RGB", s, (200, 40 * i, 90)) for i, s in enumerate(SIZES[:2])]
    batch = vlm.prepare(images, PROMPTS)
    assert (batch.attention_mask == 0).any()
    tm = batch.token_map

    def picked(tmap, b, seq):
        return np.concatenate([tmap.image_positions(b)[:5], tmap.image_positions(b)[-3:],
                               [seq - 2, seq - 1]])

    cols = [picked(tm, b, batch.seq_len) for b in range(2)]
    with torch.no_grad(), capture(vlm, cols, keys=True) as together:
        vlm.forward(batch)
    for b in range(2):
        one = vlm.prepare([images[b]], [PROMPTS[b]])
        with torch.no_grad(), capture(vlm, [picked(one.token_map, 0, one.seq_len)],
                                      keys=True) as alone:
            vlm.forward(one)
        for layer in range(vlm.num_layers):
            torch.testing.assert_close(together.of("keys_post", layer, b),
                                       alone.of("keys_post", layer, 0), rtol=1e-4, atol=1e-5)


def test_empty_interventions_equal_clean(lookalike):
    name, vlm = lookalike
    batch = vlm.prepare([Image.new("RGB", s) for s in SIZES[:2]], PROMPTS)
    clean = final_states(vlm, batch)
    empty = [[] for _ in range(batch.size)]
    with ablate(vlm, empty, "zeros"), knockout(vlm, [([], [])] * batch.size), \
            capture(vlm, empty, keys=True, values=True):
        out = final_states(vlm, batch)
    torch.testing.assert_close(out, clean, rtol=0, atol=1e-6)


def test_image_to_question_knockout_leaves_the_markers_out(lookalike):
    """The question queries of knockout's image->question condition start after the markers
    that close the image ([IMG_END], </img>, <fake_token_around_image>)."""
    name, vlm = lookalike
    batch = vlm.prepare([Image.new("RGB", (640, 480))], ["Is there a red circle here?"])
    tm = batch.token_map
    queries, keys = knockout_experiment.edge_sets(tm, batch, 0, np.ones((480, 640), bool))[
        "image->question"]
    assert np.array_equal(keys, tm.image_positions(0))
    assert queries.min() > tm.image_end(0) >= tm.image_positions(0).max()
    with torch.no_grad():
        clean = vlm.forward(batch, logits_to_keep=1).logits[0, -1]
        with knockout(vlm, [(queries, keys)]) as ko:
            blocked = vlm.forward(batch, logits_to_keep=1).logits[0, -1]
    assert ko.applied == vlm.num_layers and not torch.allclose(clean, blocked)


def test_teacher_forced_answer_equals_generation(lookalike):
    """Appending the generated tokens (extend_batch, as the experiments teacher-force answers)
    computes the logits generate computed: PaliGemma's appended tokens join the causal
    suffix (token_type_ids 1), as generate continues them; Llama-style families count on."""
    name, vlm = lookalike
    batch = vlm.prepare([Image.new("RGB", s, (10, 200, 30)) for s in SIZES[:2]], PROMPTS,
                        [None, "It is"])
    with torch.no_grad():
        out = vlm.model.generate(**batch.model_inputs(), max_new_tokens=3, min_new_tokens=3,
                                 do_sample=False, output_logits=True,
                                 return_dict_in_generate=True,
                                 pad_token_id=vlm.tokenizer.pad_token_id)
        new = out.sequences[:, batch.seq_len:]
        ext = extend_batch(batch, new[:, :-1])
        logits = vlm.forward(ext, logits_to_keep=3).logits
    for t in range(3):
        scale = float(out.logits[t].abs().max())
        torch.testing.assert_close(logits[:, t], out.logits[t], rtol=0, atol=1e-4 * scale)
    if name == PALIGEMMA:
        assert (ext.inputs["token_type_ids"][:, -2:] == 1).all()


# ---- PaliGemma: the prefix LM ------------------------------------------------------------------
@pytest.fixture(scope="module")
def paligemma():
    return vislens.load(str(checkpoint_dir(PALIGEMMA)))


def test_paligemma_prompt_is_the_processors_own(paligemma):
    """Without an answer prefix vislens' ids, token types and pixels are the processor's; an
    answer prefix joins the suffix (type 1) after the prompt's newline; a text prefix stays
    before the image tokens, and BOS follows the last image token, as the processor puts it."""
    vlm, proc = paligemma, paligemma.processor
    images = [Image.new("RGB", (300, 200), (200, 10, 10)), Image.new("RGB", (100, 200))]
    batch = vlm.prepare(images, PROMPTS)
    ref = proc(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch.inputs[key], ref[key]), key
    torch.testing.assert_close(batch.inputs["pixel_values"], ref["pixel_values"])
    assert batch.texts[0] == "<image><bos>Describe this image.\n"
    both = vlm.prepare(images, PROMPTS, ["It is", None], prefixes=["classes : cat .", None])
    types, ids = both.inputs["token_type_ids"][0], both.input_ids[0]
    assert vlm.tokenizer.decode(ids[types == 1]) == "It is"
    assert (types[both.attention_mask[0] == 1][:-2] == 0).all()
    first = int(both.token_map.image_positions(0)[0])
    assert "classes : cat ." in vlm.tokenizer.decode(ids[:first])
    last = int(both.token_map.image_positions(0)[-1])
    assert int(ids[last + 1]) == vlm.tokenizer.bos_token_id


def test_paligemma_positions_count_from_one(paligemma):
    """vislens' explicit positions are those the model makes itself (arange + 1)."""
    vlm = paligemma
    one = vlm.prepare([Image.new("RGB", (120, 90))], ["What is this?"])
    with torch.no_grad():
        ours = vlm.forward(one, logits_to_keep=8).logits
        own = vlm.model(**one.inputs, use_cache=False, logits_to_keep=8).logits
    torch.testing.assert_close(ours, own, rtol=0, atol=1e-6)


def tiny_paligemma_gemma1(processor):
    """PaliGemma (1) shape: Gemma decoder, no soft-cap, sdpa attention."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(1)
    cfg = PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=257216, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=8),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=14, vision_use_head=False),
        image_token_index=257152, projection_dim=32)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return VLM(model, processor, "paligemma")


def prefix_lm_allowed(batch) -> torch.Tensor:
    """[B, S, S] the pairs PaliGemma lets attend: causal, or both in the prefix; real keys."""
    S = batch.seq_len
    real = batch.attention_mask.bool()
    prefix = (batch.inputs["token_type_ids"] == 0) & real
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool))[None] | \
        (prefix[:, :, None] & prefix[:, None, :])
    allowed &= real[:, None, :]
    return allowed | (torch.eye(S, dtype=torch.bool)[None] & ~real[:, :, None])


@torch.no_grad()
def reference_states(vlm, batch, blocked: dict[int, torch.Tensor]) -> torch.Tensor:
    """Gemma / Gemma 2 decoder written out from the weights: softmax(capped QK^T * scale +
    prefix-LM mask + -inf on blocked pairs) V and the decoders' own norms; the last layer's
    output at every column."""
    B, S = batch.size, batch.seq_len
    with capture(vlm, [np.arange(S)] * B, layers=[0]) as cap:
        vlm.forward(batch)
    h = cap.residual[0].view(B, S, -1)
    lm = vlm.language_model
    pos = batch.attention_mask.long().cumsum(-1) - 1 + 1
    cos, sin = lm.rotary_emb(h, pos)
    rope = sys.modules[type(vlm.layers[0].self_attn).__module__].apply_rotary_pos_emb
    allowed = prefix_lm_allowed(batch)
    for idx, layer in enumerate(vlm.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        hd = attn.head_dim
        q = attn.q_proj(x).view(B, S, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(B, S, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, S, -1, hd).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) * attn.scaling
        softcap = getattr(attn, "attn_logit_softcapping", None)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        mask = torch.zeros(B, S, S).masked_fill(~allowed, float("-inf"))
        if idx in blocked:
            mask = mask.masked_fill(blocked[idx], float("-inf"))
        o = (torch.softmax((scores + mask[:, None]).float(), -1) @ v).transpose(1, 2)
        o = attn.o_proj(o.reshape(B, S, -1))
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2: sandwich norms
            h = h + layer.post_attention_layernorm(o)
            h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        else:
            h = h + o
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["paligemma2-eager-softcap", "paligemma1-sdpa"])
def test_prefix_lm_knockout_equals_reference(paligemma, kind):
    """Knockout on top of the bidirectional prefix mask == the written-out reference with the
    same blocked pairs, including pairs the causal mask would never allow (an image token
    reading the question after it), for PaliGemma 2 (eager, soft-capped) and PaliGemma 1
    (sdpa); an empty knockout is the clean run."""
    vlm = paligemma if kind.startswith("paligemma2") else tiny_paligemma_gemma1(
        paligemma.processor)
    images = [Image.new("RGB", s, (200, 40 * i, 90)) for i, s in enumerate(SIZES[:2])]
    batch = vlm.prepare(images, PROMPTS, [None, "It is"])
    real = batch.attention_mask.bool()
    clean = final_states(vlm, batch)
    reference = reference_states(vlm, batch, {})
    torch.testing.assert_close(clean[real], reference[real], rtol=0, atol=2e-5)
    S, rng = batch.seq_len, np.random.default_rng(0)
    edges, blocked = [], torch.zeros(batch.size, S, S, dtype=torch.bool)
    tm = batch.token_map
    for b in range(batch.size):
        image = tm.image_positions(b)
        text = np.arange(image.max() + 2, S)  # after BOS: the question (and answer prefix)
        backward = (rng.choice(image, 20, replace=False), text)  # image reads the question
        forward_ = ("last", rng.choice(image, len(image) // 2, replace=False))
        edges.append([backward, forward_])
        blocked[b, backward[0][:, None], backward[1][None]] = True
        blocked[b, S - 1, forward_[1]] = True
    assert (blocked & ~torch.tril(torch.ones(S, S, dtype=torch.bool))).any()
    for layers in ([0], [0, 1]):
        with knockout(vlm, edges, layers=layers) as ko:
            out = final_states(vlm, batch)
        assert ko.applied == len(layers)
        ref = reference_states(vlm, batch, {layer: blocked for layer in layers})
        torch.testing.assert_close(out[real], ref[real], rtol=0, atol=2e-5)
        assert (ref[:, -1] - clean[:, -1]).abs().max() > 1e-4  # the edges mattered
        with knockout(vlm, edges, layers=layers), torch.no_grad():  # and the logits follow
            last = vlm.forward(batch, logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(last, vlm.unembed(ref[:, -1]), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_paligemma_captured_attention_rows_are_output_attentions(paligemma):
    """Attention rows captured through the registered function (soft-cap and bidirectional
    prefix included) equal the eager model's `output_attentions`, for a prefix query (an
    image token, which sees the question after it) and the last query."""
    vlm = paligemma
    batch = vlm.prepare([Image.new("RGB", s) for s in SIZES[:2]], PROMPTS, [None, "It is"])
    tm = batch.token_map
    queries = [[int(tm.image_positions(b)[7]), batch.seq_len - 1] for b in range(2)]
    with capture(vlm, [[]] * 2, attention_queries=queries) as cap, torch.no_grad():
        vlm.forward(batch)
    with torch.no_grad():
        weights = vlm.model(**batch.inputs, output_attentions=True, use_cache=False,
                            position_ids=batch.attention_mask.long().cumsum(-1),
                            logits_to_keep=1).attentions
    rows = cap.attention_rows
    for layer, w in enumerate(weights):
        expected = w[rows[:, 0], :, rows[:, 1]]
        torch.testing.assert_close(cap.attention[layer], expected.float(), rtol=0, atol=1e-5)
        image_row = cap.attention[layer][0]  # image token 7 of sample 0
        after = torch.as_tensor(np.arange(tm.image_positions(0).max() + 1, batch.seq_len))
        assert image_row[:, after].sum() > 0  # it reads text that comes after it


def test_paligemma_unembed_is_the_soft_capped_logits(paligemma):
    vlm = paligemma
    batch = vlm.prepare([Image.new("RGB", (90, 90))], ["What is this?"])
    cols = [np.arange(batch.seq_len - 4, batch.seq_len)]
    with capture(vlm, cols, layers=[vlm.num_layers - 1]) as cap, torch.no_grad():
        logits = vlm.forward(batch, logits_to_keep=4).logits
    torch.testing.assert_close(vlm.unembed(cap.residual[vlm.num_layers]), logits[0],
                               rtol=0, atol=1e-5)
    assert vlm.family.logit_softcap(vlm.config) == 30.0 and logits.abs().max() < 30


def test_family_declarations():
    from vislens.models.families import family_for

    assert {FAMILY[n] for n in NAMES} == {"idefics3", "internvl", "mistral3", "paligemma"}
    assert family_for("paligemma").attn_implementation(
        {"text_config": {"model_type": "gemma2"}}) == "eager"
    assert family_for("paligemma").attn_implementation(
        {"text_config": {"model_type": "gemma"}}) == "sdpa"
    assert family_for("idefics3").decoder.__func__ is not None
    assert not family_for("paligemma").multi_image and family_for("internvl").multi_image
