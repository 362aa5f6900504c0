"""Exactness of activation patching (interventions/patch.py) and attribution patching.

Every check compares the patched run with something computed another way: the clean
run itself, a forward hook written here over activations recorded by `capture` or by
hooks of this file, the same pairs run one at a time, another site kind, or finite
differences in float64. Each runs on the toys and on look-alikes of the checkpoints the
paper experiments use (real processors, token counts, any-res grids, mRoPE, left padding),
Gemma 3 (bidirectional image block), PaliGemma (prefix LM: image and prompt attend both ways)
and Qwen3-VL (DeepStack) included.
"""

from __future__ import annotations

import lookalikes
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

import vislens
from vislens.data import shapesworld
from vislens.experiments.batching import repeat_batch
from vislens.interventions import (
    LayoutMismatch,
    Site,
    ablate,
    attach,
    attribution,
    capture,
    knockout,
    logit_difference,
    patch,
    record_sites,
    restored_share,
    site_grid,
)

torch.set_num_threads(2)
TOL = 1e-5
# logits of the last KEEP columns (the look-alikes keep their real vocabularies, up to 262k:
# every later column reads every earlier one, so a wrong restore shows there)
KEEP = 24
QWEN3VL, GEMMA3, PALIGEMMA = lookalikes.QWEN3VL, lookalikes.GEMMA3, lookalikes.PALIGEMMA
HEAVY = [pytest.mark.lookalike, pytest.mark.slow]
CASES = ["toy", pytest.param("toy-qwen", marks=pytest.mark.slow),
         *(pytest.param(n, marks=HEAVY) for n in (lookalikes.LLAVA15, lookalikes.ONEVISION,
                                                   lookalikes.QWEN25VL, GEMMA3, PALIGEMMA,
                                                   QWEN3VL))]
LOOKALIKE_PROMPTS = ["Is there a cat in this image?", "What is it?"]


def _path(name: str) -> str:
    if name.startswith("toy"):
        return name
    return str(lookalikes.checkpoint_dir(name))


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def _recoloured(sample, color=(0, 0, 255)) -> Image.Image:
    """The scene with its first object painted another colour: same size, same tokens."""
    px = np.array(sample.image)
    px[sample.instances[0].mask] = color
    return Image.fromarray(px)


def _pair(vlm, name: str):
    """(clean, corrupted) 2-row batches of two prompts of different lengths (one left padded)."""
    if name.startswith("toy"):
        scenes = [shapesworld.make_scene(1000, i) for i in (0, 3)]
        shape = scenes[0].instances[0].attributes["shape"]
        prompts = [f"what color is the {shape} ?",
                   f"is there a {scenes[1].instances[0].name} in this image ?"]
        prefixes = ["it is", None]
        clean = [s.image for s in scenes]
        corrupt = [_recoloured(s) for s in scenes]
    else:
        sizes = [(200, 150), (150, 190)]
        prompts = LOOKALIKE_PROMPTS
        # PaliGemma's prefix (image + prompt) attends both ways; an answer prefix is its
        # causal suffix, the columns nothing earlier reads (one row has none)
        prefixes = ["It is", None] if name == PALIGEMMA else None
        clean = [_noise(s, i) for i, s in enumerate(sizes)]
        corrupt = [_noise(s, 10 + i) for i, s in enumerate(sizes)]
    return prompts, prefixes, clean, corrupt


@pytest.fixture(scope="module", params=CASES)
def case(request):
    vlm = vislens.load(_path(request.param))
    prompts, prefixes, clean_images, corrupt_images = _pair(vlm, request.param)
    clean = vlm.prepare(clean_images, prompts, answer_prefixes=prefixes)
    corrupt = vlm.prepare(corrupt_images, prompts, answer_prefixes=prefixes)
    for batch in (clean, corrupt):  # one vision pass each; every forward reuses it
        vlm.image_embeddings(batch)
    mask = clean.attention_mask.bool()
    assert not bool(mask.all()), "one row must be left padded"
    with torch.no_grad():
        want_clean = vlm.forward(clean, logits_to_keep=KEEP).logits
        want_corrupt = vlm.forward(corrupt, logits_to_keep=KEEP).logits
    assert _gap(want_clean, want_corrupt, mask) > 1e-3, "the corruption must change the logits"
    return dict(name=request.param, vlm=vlm, clean=clean, corrupt=corrupt, mask=mask,
                clean_logits=want_clean, corrupt_logits=want_corrupt, prompts=prompts,
                prefixes=prefixes, clean_images=clean_images, corrupt_images=corrupt_images)


def _hooks(vlm) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks)
               for m in vlm.language_model.modules())


@pytest.fixture(autouse=True)
def no_hooks_left(request):
    """Every patch removes what it registered, also when it refuses to start."""
    if "case" not in request.fixturenames:
        yield
        return
    vlm = request.getfixturevalue("case")["vlm"]
    attach(vlm)  # capture's own lasting hook (it counts tokens per pass) is not a leak
    before = _hooks(vlm)
    yield
    assert _hooks(vlm) == before
    assert "_deepstack_process" not in vars(vlm.language_model)


def _gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |a - b| over real (not padding) positions."""
    return float((a - b).abs().amax(-1)[mask[:, -a.shape[1]:]].max())


def _injections(vlm, source) -> int:
    return len(source.injected[0]) if vlm.family.deepstack else 0


def _run(vlm, batch, source, sites, positions=None, **kw) -> torch.Tensor:
    with patch(vlm, source, batch, sites, positions, **kw) as h, torch.no_grad():
        out = vlm.forward(batch, logits_to_keep=KEEP).logits
    assert all(n == 1 for n in h.applied.values()), h.applied
    return out


def _group(batch, step: int = 3) -> list[np.ndarray]:
    """Every step-th image patch column of each row: a position group of a sweep."""
    return [batch.token_map.image_positions(b)[::step] for b in range(batch.size)]


# ---- whole layers --------------------------------------------------------------------------
def test_restoring_every_column_of_any_layer_gives_the_clean_logits(case):
    vlm, clean, corrupt, mask = case["vlm"], case["clean"], case["corrupt"], case["mask"]
    L = vlm.num_layers
    source = record_sites(vlm, clean, site_grid("residual", range(L + 1)),
                          logits_to_keep=KEEP)
    torch.testing.assert_close(source.logits, case["clean_logits"], rtol=0, atol=0)
    n = _injections(vlm, source)
    for layer in range(L + 1):
        if layer < n:  # DeepStack: the later additions come from the corrupted image
            got = _run(vlm, corrupt, source, [("residual", layer)], injected=True)
            assert _gap(got, case["clean_logits"], mask) < TOL, layer
            kept = _run(vlm, corrupt, source, [("residual", layer)], injected=False)
            assert _gap(kept, case["clean_logits"], mask) > 1e-3, layer
        else:
            got = _run(vlm, corrupt, source, [("residual", layer)])
            assert _gap(got, case["clean_logits"], mask) < TOL, layer
    nothing = _run(vlm, corrupt, source, [("residual", L // 2)], [[], []], injected=False)
    torch.testing.assert_close(nothing, case["corrupt_logits"], rtol=0, atol=0)


def test_deepstack_needs_a_choice_below_the_last_injection(case):
    vlm = case["vlm"]
    if not vlm.family.deepstack:
        pytest.skip("only DeepStack families add image features after their first layers")
    source = record_sites(vlm, case["clean"], [("residual", 0), ("residual", 3)],
                          logits_to_keep=KEEP)
    assert _injections(vlm, source) == 3
    with pytest.raises(ValueError, match="injected=True"):
        with patch(vlm, source, case["corrupt"], [("residual", 0)]):
            pass
    with patch(vlm, source, case["corrupt"], [("residual", 3)]):  # above them: no choice
        pass


# ---- independent references ----------------------------------------------------------------
def _overwrite(values: dict[int, torch.Tensor], positions):
    """A forward pre-hook (written here, not patch's) putting values[b] at positions[b]."""
    def hook(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        for b, cols in enumerate(positions):
            hidden[b, torch.as_tensor(cols, dtype=torch.long)] = values[b]
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs
    return hook


def test_residual_patch_equals_a_hand_written_hook(case):
    vlm, clean, corrupt, mask = case["vlm"], case["clean"], case["corrupt"], case["mask"]
    L = vlm.num_layers
    group = _group(corrupt)
    source = record_sites(vlm, clean, site_grid("residual", range(L)), logits_to_keep=KEEP)
    for layer in sorted({0, L // 2, L - 1}):
        cols = [np.arange(clean.seq_len)] * clean.size
        with capture(vlm, cols, layers=[layer]) as cap, torch.no_grad():
            vlm.forward(clean, logits_to_keep=1)
        full = cap.residual[layer].view(clean.size, clean.seq_len, -1)
        values = {b: full[b, torch.as_tensor(group[b])] for b in range(clean.size)}
        handle = vlm.layers[layer].register_forward_pre_hook(_overwrite(values, group),
                                                             with_kwargs=True)
        try:
            with torch.no_grad():
                want = vlm.forward(corrupt, logits_to_keep=KEEP).logits
        finally:
            handle.remove()
        got = _run(vlm, corrupt, source, [("residual", layer)], group, injected=False)
        assert _gap(got, want, mask) < TOL, layer
        assert _gap(got, case["corrupt_logits"], mask) > 1e-4, "the patch must change the run"


def test_deepstack_restore_equals_ablating_with_the_clean_additions(case):
    """injected=True == the residual hook above plus `ablate` handing the injected features
    (its own code path) the clean ones from layer l on and the corrupted ones below."""
    vlm, clean, corrupt, mask = case["vlm"], case["clean"], case["corrupt"], case["mask"]
    if not vlm.family.deepstack:
        pytest.skip("only DeepStack families add image features after their first layers")
    group = _group(corrupt)
    layer = 1
    source = record_sites(vlm, clean, [("residual", layer)], logits_to_keep=KEEP)
    cols = [np.arange(clean.seq_len)] * clean.size
    with capture(vlm, cols, layers=[0, layer]) as clean_cap, torch.no_grad():
        vlm.forward(clean, logits_to_keep=1)
    with capture(vlm, cols, layers=[0]) as corrupt_cap, torch.no_grad():
        vlm.forward(corrupt, logits_to_keep=1)
    full = clean_cap.residual[layer].view(clean.size, clean.seq_len, -1)
    own = corrupt_cap.residual[0].view(clean.size, clean.seq_len, -1)
    feats = {"clean": vlm.image_embeddings(clean).injected,
             "corrupt": vlm.image_embeddings(corrupt).injected}  # [image][layer] rows
    injected, embeds = [], []
    for b in range(clean.size):
        local = np.searchsorted(corrupt.token_map.image_positions(b), group[b])
        injected.append([feats["clean" if k >= layer else "corrupt"][b][k][local]
                         for k in range(3)])
        embeds.append(own[b, torch.as_tensor(group[b])])
    values = {b: full[b, torch.as_tensor(group[b])] for b in range(clean.size)}
    handle = vlm.layers[layer].register_forward_pre_hook(_overwrite(values, group),
                                                         with_kwargs=True)
    try:
        with ablate(vlm, group, embeds, injected=injected), torch.no_grad():
            want = vlm.forward(corrupt, logits_to_keep=KEEP).logits
    finally:
        handle.remove()
    got = _run(vlm, corrupt, source, [("residual", layer)], group, injected=True)
    assert _gap(got, want, mask) < TOL
    alone = _run(vlm, corrupt, source, [("residual", layer)], group, injected=False)
    assert _gap(alone, want, mask) > 1e-4


def test_attn_and_mlp_patches_equal_hand_written_module_hooks(case):
    vlm, clean, corrupt, mask = case["vlm"], case["clean"], case["corrupt"], case["mask"]
    group = _group(corrupt, step=2)
    L = vlm.num_layers
    source = record_sites(vlm, clean, site_grid(["attn", "mlp"], range(L)),
                          logits_to_keep=KEEP)
    for kind in ("attn", "mlp"):
        for layer in sorted({0, L - 1}):
            module = getattr(vlm.layers[layer], "self_attn" if kind == "attn" else "mlp")
            kept = {}

            def keep(m, a, out, kept=kept):
                kept["out"] = (out[0] if isinstance(out, tuple) else out).detach()

            def put(m, a, out, kept=kept):
                first = (out[0] if isinstance(out, tuple) else out).clone()
                for b, cols in enumerate(group):
                    idx = torch.as_tensor(cols, dtype=torch.long)
                    first[b, idx] = kept["out"][b, idx]
                return (first, *out[1:]) if isinstance(out, tuple) else first

            for fn in (keep, put):
                handle = module.register_forward_hook(fn)
                try:
                    with torch.no_grad():
                        want = vlm.forward(clean if fn is keep else corrupt,
                                           logits_to_keep=KEEP).logits
                finally:
                    handle.remove()
            got = _run(vlm, corrupt, source, [(kind, layer)], group)
            assert _gap(got, want, mask) < TOL, (kind, layer)
            assert _gap(got, case["corrupt_logits"], mask) > 1e-4, (kind, layer)


# ---- batching --------------------------------------------------------------------------------
def test_a_padded_batch_patches_each_pair_as_alone(case):
    vlm, clean, corrupt = case["vlm"], case["clean"], case["corrupt"]
    sites = [("residual", 1), ("attn", 0), ("mlp", vlm.num_layers - 1)]
    group = _group(corrupt, step=4)
    source = record_sites(vlm, clean, sites, logits_to_keep=KEEP)
    together = _run(vlm, corrupt, source, sites, group, injected=False)
    mask = case["mask"]
    for b in range(clean.size):
        prefixes = None if case["prefixes"] is None else [case["prefixes"][b]]
        one_clean = vlm.prepare([case["clean_images"][b]], [case["prompts"][b]], prefixes)
        one_corrupt = vlm.prepare([case["corrupt_images"][b]], [case["prompts"][b]], prefixes)
        pad = int((~mask[b]).sum())
        assert one_clean.seq_len == clean.seq_len - pad
        one_source = record_sites(vlm, one_clean, sites, logits_to_keep=KEEP)
        alone = _run(vlm, one_corrupt, one_source, sites,
                     [group[b] - pad], injected=False)
        torch.testing.assert_close(together[b], alone[0], rtol=0, atol=TOL)  # last KEEP


def test_continuing_the_corrupted_run_equals_patching_the_whole_pass(case):
    """patch_continued (the corrupted run recorded once, rows run from their first restored
    column and the site's layer) gives the logits of `patch` over the whole pass: each
    column set alone and all together, every site kind, layer 0 included; an empty set is
    the corrupted run. Families whose pass cannot be continued are refused in one line."""
    from vislens.experiments.batching import repeat_batch
    from vislens.interventions import patch_continued
    from vislens.interventions.continuation import record

    vlm = case["vlm"]
    L = vlm.num_layers
    prefixes = None if case["prefixes"] is None else case["prefixes"][:1]
    clean = vlm.prepare(case["clean_images"][:1], case["prompts"][:1], prefixes)
    corrupt = vlm.prepare(case["corrupt_images"][:1], case["prompts"][:1], prefixes)
    sites = [Site("residual", 0), Site("residual", L // 2), Site("attn", 1 % L),
             Site("mlp", L - 1)]
    source = record_sites(vlm, clean, sites, logits_to_keep=1)
    rec = record(vlm, corrupt, residual_layers=range(1, L))
    if not rec.reusable:
        with pytest.raises(ValueError, match="cannot be continued"):
            patch_continued(vlm, source, corrupt, rec, sites[0], [[0]])
        return
    S = corrupt.seq_len
    image = corrupt.token_map.image_positions(0)
    sets = [image[::3], np.array([S - 1]), np.arange(corrupt.token_map.image_end(0) + 1, S),
            image[-2:], np.zeros(0, dtype=np.int64)]
    feats = vlm.image_embeddings(corrupt)
    for site in sites:
        batch = repeat_batch(corrupt, len(sets))
        with patch(vlm, source.select([0] * len(sets)), batch, [site], sets,
                   injected=False), torch.no_grad():
            want = vlm.forward(batch, image_features=feats * len(sets), logits_to_keep=1).logits
        together = patch_continued(vlm, source, corrupt, rec, site, sets)
        torch.testing.assert_close(together, want, rtol=0, atol=TOL)
        for i, cols in enumerate(sets):
            alone = patch_continued(vlm, source, corrupt, rec, site, [cols])
            torch.testing.assert_close(alone[0], want[i], rtol=0, atol=TOL)
        torch.testing.assert_close(want[-1], rec.logits[0], rtol=0, atol=TOL)  # nothing
    with pytest.raises(ValueError, match="keep=2 reaches before column"):
        patch_continued(vlm, source, corrupt, rec, sites[0], [[S - 1]], keep=2)
        assert float((want[:-1] - rec.logits).abs().max()) > 1e-4, site  # some set restores


def _first_read_by_none_before(batch, b: int) -> int:
    """The first column of row b that no earlier column reads: after the image, and after
    a prefix-LM's bidirectional prefix (token_type_ids 0) where the family has one."""
    start = batch.token_map.image_end(b) + 1
    types = batch.inputs.get("token_type_ids")
    if types is not None:
        causal = np.flatnonzero(types[b].numpy() == 1)
        start = max(start, int(causal[0]) if len(causal) else batch.seq_len)
    return start


# ---- site kinds agree ------------------------------------------------------------------------
def test_residual_attn_and_mlp_of_layer_l_make_the_residual_of_l_plus_1(case):
    """Restoring layer l's input, attention and MLP at columns nothing earlier reads at that
    layer (a suffix: every column after the image) gives layer l+1's clean input there: the
    same run as restoring the residual of l+1. At every column both are the clean run.
    (attn + mlp alone do not: the layer adds them to the corrupted residual it received.)
    Gemma 3's image block and PaliGemma's prefix attend both ways, so their suffix starts
    after the block (PaliGemma: at the causal suffix, token_type_ids 1)."""
    vlm, clean, corrupt, mask = case["vlm"], case["clean"], case["corrupt"], case["mask"]
    L = vlm.num_layers
    source = record_sites(vlm, clean, site_grid(["residual", "attn", "mlp"], range(L)) +
                          [Site("residual", L)], logits_to_keep=KEEP)
    suffix = [np.arange(_first_read_by_none_before(corrupt, b), corrupt.seq_len)
              for b in range(corrupt.size)]
    for layer in sorted({0, L // 2, L - 1}):
        parts = [("residual", layer), ("attn", layer), ("mlp", layer)]
        for cols in (None, suffix):
            got = _run(vlm, corrupt, source, parts, cols, injected=True)
            want = _run(vlm, corrupt, source, [("residual", layer + 1)], cols, injected=True)
            assert _gap(got, want, mask) < TOL, (layer, cols is None)
            if cols is None:
                assert _gap(got, case["clean_logits"], mask) < TOL
            else:
                assert _gap(got, case["corrupt_logits"], mask) > 1e-4
                assert _gap(got, case["clean_logits"], mask) > 1e-4
        alone = _run(vlm, corrupt, source, parts[1:], None)
        assert _gap(alone, case["clean_logits"], mask) > 1e-4, layer


# ---- composition -----------------------------------------------------------------------------
def test_capture_reads_the_restored_value_nested_either_way(case):
    vlm, clean, corrupt = case["vlm"], case["clean"], case["corrupt"]
    layer = 1
    group = _group(corrupt)
    source = record_sites(vlm, clean, [("residual", layer)], logits_to_keep=KEEP)
    for order in ("capture inside", "capture outside"):
        if order == "capture inside":
            with patch(vlm, source, corrupt, [("residual", layer)], group, injected=False), \
                    capture(vlm, group, layers=[layer]) as cap, torch.no_grad():
                vlm.forward(corrupt, logits_to_keep=1)
        else:
            with capture(vlm, group, layers=[layer]) as cap, \
                    patch(vlm, source, corrupt, [("residual", layer)], group, injected=False), \
                    torch.no_grad():
                vlm.forward(corrupt, logits_to_keep=1)
        want = torch.cat([source[("residual", layer)][b, torch.as_tensor(group[b])]
                          for b in range(corrupt.size)])
        torch.testing.assert_close(cap.residual[layer], want, rtol=0, atol=0)


def test_patch_composes_with_knockout_and_ablation(case):
    """Under a knockout in both runs, restoring a whole layer gives the knocked-out clean run;
    patching the input embeddings wins over an ablation of the same columns."""
    vlm, clean, corrupt, mask = case["vlm"], case["clean"], case["corrupt"], case["mask"]
    tm = corrupt.token_map
    edges = [("last", tm.image_positions(b)) for b in range(corrupt.size)]
    with knockout(vlm, edges):
        source = record_sites(vlm, clean, [("residual", 1)], logits_to_keep=KEEP)
        got = _run(vlm, corrupt, source, [("residual", 1)], injected=True)
    assert _gap(got, source.logits, mask) < TOL
    assert _gap(source.logits, case["clean_logits"], mask) > 1e-4  # the knockout acted
    group = _group(corrupt)
    source = record_sites(vlm, clean, [("residual", 0)], logits_to_keep=KEEP)
    with ablate(vlm, group, "zeros", injected="keep" if vlm.family.deepstack else None):
        got = _run(vlm, corrupt, source, [("residual", 0)], group, injected=False)
    want = _run(vlm, corrupt, source, [("residual", 0)], group, injected=False)
    assert _gap(got, want, mask) < TOL


def test_generate_patches_the_prefill_only(case):
    """Restoring the input embeddings of every prompt column makes generate continue as the
    clean run does: its new tokens are computed from the clean cache, not patched (the
    patch counts one pass). From layer 1 only the first new token is sure to be the clean
    one: the prompt's keys and values of layer 0 stay the corrupted run's."""
    vlm, clean, corrupt = case["vlm"], case["clean"], case["corrupt"]
    want = vlm.generate(clean, max_new_tokens=4)
    source = record_sites(vlm, clean, [("residual", 0), ("residual", 1)], logits_to_keep=KEEP)
    with patch(vlm, source, corrupt, [("residual", 0)], injected=True) as h:
        got = vlm.generate(corrupt, max_new_tokens=4)
    assert h.applied[Site("residual", 0)] == 1
    assert torch.equal(got, want)
    with patch(vlm, source, corrupt, [("residual", 1)], injected=True):
        first = vlm.generate(corrupt, max_new_tokens=1)
    assert torch.equal(first, want[:, :1])


# ---- layouts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, sizes", [
    pytest.param(lookalikes.ONEVISION, [(300, 400), (500, 300)],  # another grid and count
                 marks=HEAVY),
    pytest.param(lookalikes.QWEN25VL, [(280, 140), (140, 280)],  # same count, transposed
                 marks=HEAVY),  # grid: mRoPE
    ("toy", None),  # same image, another prompt length
])
def test_mismatched_layouts_are_refused_in_one_line(name, sizes):
    vlm = vislens.load(_path(name))
    if sizes is None:
        image = shapesworld.make_scene(1000, 0).image
        clean = vlm.prepare([image], ["what color is the star ?"])
        corrupt = vlm.prepare([image], ["is there a red star in this image ?"])
    else:
        clean = vlm.prepare([_noise(sizes[0], 0)], ["What is it?"])
        corrupt = vlm.prepare([_noise(sizes[1], 1)], ["What is it?"])
        if name == lookalikes.QWEN25VL:
            assert len(clean.token_map) == len(corrupt.token_map)
    source = record_sites(vlm, clean, [("residual", 1)], logits_to_keep=1)
    with pytest.raises(ValueError, match="same token layout") as err:
        with patch(vlm, source, corrupt, [("residual", 1)]):
            pass
    assert isinstance(err.value, LayoutMismatch) and "\n" not in str(err.value)
    with pytest.raises(LayoutMismatch):
        attribution(vlm, source, corrupt, logit_difference(0, 1), layers=[1])


# ---- attribution patching --------------------------------------------------------------------
def _answer_and_foil(clean_logits, corrupt_logits):
    """Per row: the clean run's top token and the corrupted run's (another if they agree)."""
    answer = clean_logits[:, -1].argmax(-1)
    top2 = corrupt_logits[:, -1].topk(2).indices
    foil = torch.where(top2[:, 0] == answer, top2[:, 1], top2[:, 0])
    return answer, foil


def _nudge(vlm, kind: str, layer: int, row: int, cols, delta: torch.Tensor,
           eps: torch.Tensor):
    """A hook (written here) adding eps * delta at (row, cols) of one site: d metric / d eps
    is the directional derivative attribution patching claims."""
    idx = torch.as_tensor(np.asarray(cols, dtype=np.int64))

    def add(hidden):
        step = torch.zeros_like(hidden)
        step[row, idx] = delta.to(hidden.dtype)
        return hidden + eps.to(hidden.dtype) * step

    if kind == "residual" and layer < vlm.num_layers:
        def pre(m, args, kwargs):
            if args:
                return (add(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = add(kwargs["hidden_states"])
            return args, kwargs
        return vlm.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    module = vlm.layers[-1] if kind == "residual" else \
        getattr(vlm.layers[layer], "self_attn" if kind == "attn" else "mlp")
    return module.register_forward_hook(
        lambda m, a, out: (add(out[0]), *out[1:]) if isinstance(out, tuple) else add(out))


def _attribution_case(vlm, clean, corrupt):
    L = vlm.num_layers
    all_sites = site_grid(["residual", "attn", "mlp"], range(L))
    clean_acts = record_sites(vlm, clean, all_sites, logits_to_keep=1)
    corrupt_acts = record_sites(vlm, corrupt, all_sites, logits_to_keep=1)
    metric = logit_difference(*_answer_and_foil(clean_acts.logits, corrupt_acts.logits))
    att = attribution(vlm, clean_acts, corrupt, metric, kinds=("residual", "attn", "mlp"))
    torch.testing.assert_close(att.corrupt.to(corrupt_acts.logits.dtype),
                               metric(corrupt_acts.logits).cpu())
    return clean_acts, corrupt_acts, metric, att


def test_attribution_equals_an_autograd_reference(case):
    """Each (site, column) effect and a group's sum equal d metric / d eps of the corrupted
    run with eps * (clean - corrupted) added there by a hook of this file: the first-order
    term attribution patching estimates, for single columns and whole groups alike."""
    vlm, clean, corrupt = case["vlm"], case["clean"], case["corrupt"]
    L = vlm.num_layers
    clean_acts, corrupt_acts, metric, att = _attribution_case(vlm, clean, corrupt)
    image = [corrupt.token_map.image_positions(b) for b in range(corrupt.size)]
    checks = [("residual", 0, 0, [image[0][5]]), ("residual", L - 1, 1, [corrupt.seq_len - 1]),
              ("attn", 0, 1, [image[1][-1]]), ("mlp", L - 1, 0, [image[0][len(image[0]) // 2]]),
              ("residual", 1, 0, image[0]), ("mlp", 0, 1, image[1][::2]),
              ("attn", L - 1, 0, np.arange(corrupt.seq_len - 4, corrupt.seq_len))]
    for kind, layer, row, cols in checks:
        site = Site(kind, layer)
        idx = torch.as_tensor(np.asarray(cols, dtype=np.int64))
        delta = (clean_acts[site] - corrupt_acts[site])[row, idx]
        eps = torch.zeros((), requires_grad=True)
        handle = _nudge(vlm, kind, layer, row, cols, delta, eps)
        try:
            value = metric(vlm.forward(corrupt, grad=True, logits_to_keep=1).logits)[row]
            (want,) = torch.autograd.grad(value, eps)
        finally:
            handle.remove()
        got = att.at(kind, row, cols)[att.layers.index(layer)].sum()
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-6,
                                   msg=lambda m, s=(kind, layer): f"{s}: {m}")
    assert float(att.effects["residual"][:, 1].abs().sum()) > 1e-3  # not all zeros
    padding = ~case["mask"]
    assert float(att.effects["residual"][:, 1][padding].abs().max()) < 1e-6


@pytest.mark.parametrize("name", CASES)
def test_attribution_matches_finite_differences(name):
    """In float64, a group's effect is the slope of the metric along the straight line from
    the corrupted to the clean activations of the group, by central differences through
    `patch` (`Activations.mixed`), a path that shares nothing with the backward pass.
    (Single columns are left to the autograd reference: their slope is often below what
    the families' norms, which compute in float32 whatever the model's dtype, resolve.)"""
    vlm = vislens.load(_path(name), dtype=torch.float64)
    prompts, prefixes, clean_images, corrupt_images = _pair(vlm, name)
    clean = vlm.prepare(clean_images, prompts, answer_prefixes=prefixes)
    corrupt = vlm.prepare(corrupt_images, prompts, answer_prefixes=prefixes)
    L = vlm.num_layers
    clean_acts, corrupt_acts, metric, att = _attribution_case(vlm, clean, corrupt)
    image = [corrupt.token_map.image_positions(b) for b in range(corrupt.size)]
    checks = [("residual", 1, 0, image[0]), ("mlp", 0, 1, image[1]), ("attn", 0, 0, image[0]),
              ("attn", L - 1, 1, [corrupt.seq_len - 1]),
              ("residual", L - 1, 1, [corrupt.seq_len - 1])]
    eps = 1e-2
    bad = []
    for kind, layer, row, cols in checks:
        positions = [cols if b == row else [] for b in range(corrupt.size)]

        def slope(h, kind=kind, layer=layer, row=row, positions=positions):
            ends = []
            for w in (h, -h):
                with patch(vlm, corrupt_acts.mixed(clean_acts, w), corrupt, [(kind, layer)],
                           positions, injected=False), torch.no_grad():
                    ends.append(float(metric(vlm.forward(corrupt, logits_to_keep=1).logits)[row]))
            return (ends[0] - ends[1]) / (2 * h)

        # Richardson: the eps^2 terms of the two central differences cancel
        numeric = (4 * slope(eps) - slope(2 * eps)) / 3
        analytic = float(att.at(kind, row, cols)[att.layers.index(layer)].sum())
        print(f"{name} {kind} {layer}: finite differences {numeric:.6g}, attribution "
              f"{analytic:.6g}")
        if abs(numeric - analytic) > 1e-3 * abs(analytic) + 1e-5 or analytic == 0:
            bad.append((kind, layer, numeric, analytic))
    assert not bad


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy", "toy-qwen"])
def test_attribution_ranks_image_tokens_as_exact_patching_does(name):
    """On a colour question whose answer the corruption flips (the object repainted), the
    attribution estimate of restoring each (layer, image token) of the residual and the
    exact effect rank the sites alike. The number is printed; the test asks only that the
    correlation be positive (it is well above on this seed)."""
    vlm = vislens.load(name)
    scene = shapesworld.make_scene(1000, 0)
    inst = scene.instances[0]
    question = f"what color is the {inst.attributes['shape']} ?"
    clean = vlm.prepare([scene.image], [question], answer_prefixes=["it is"])
    corrupt = vlm.prepare([_recoloured(scene)], [question], answer_prefixes=["it is"])
    tok = vlm.tokenizer
    answer, foil = (tok.convert_tokens_to_ids(w) for w in (inst.attributes["color"], "blue"))
    metric = logit_difference(answer, foil)
    L = vlm.num_layers
    source = record_sites(vlm, clean, site_grid("residual", range(L)), logits_to_keep=1)
    att = attribution(vlm, source, corrupt, metric)
    assert float(att.clean) > 0 > float(att.corrupt), "the corruption must flip the answer"
    cols = corrupt.token_map.image_positions(0)
    estimate = att.at("residual", 0, cols)  # [layers, image tokens]
    exact = torch.zeros_like(estimate)
    chunk = 48
    features = vlm.image_embeddings(corrupt)
    for start in range(0, len(cols), chunk):
        part = cols[start:start + chunk]
        rows = repeat_batch(corrupt, len(part))  # one condition per row, one vision pass
        many = source.select([0] * len(part))
        for layer in range(L):
            with patch(vlm, many, rows, [("residual", layer)], [[c] for c in part]), \
                    torch.no_grad():
                out = vlm.forward(rows, image_features=features * len(part), logits_to_keep=1)
                value = metric(out.logits)
            exact[layer, start:start + len(part)] = value - att.corrupt
    rho = spearmanr(estimate.flatten().numpy(), exact.flatten().numpy()).statistic
    per_layer = [round(float(spearmanr(estimate[x].numpy(), exact[x].numpy()).statistic), 3)
                 for x in range(L)]
    share = restored_share(exact + att.corrupt, att.clean, att.corrupt).amax(1)
    print(f"\n{name}: Spearman(attribution, exact patching) over {L} layers x {len(cols)} "
          f"image tokens = {rho:.3f}; per layer {per_layer}; largest share one token "
          f"restores, per layer {[round(float(s), 3) for s in share]}")
    assert rho > 0


def test_restored_share():
    got = restored_share(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([3.0, 3.0, 2.0]),
                         torch.tensor([-1.0, -1.0, 2.0]))
    torch.testing.assert_close(got[:2], torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert torch.isnan(got[2])
