"""What perception reads from the model: the vision / projector baselines tie to the right
image tokens, text spans map to their own tokens, a prefix lands before the image, and
knocked-out artifact keys change text values but never image values."""

import numpy as np
import pytest
import torch

from vislens.data import shapesworld
from vislens.experiments.perception.features import KeyCells, extract, text_columns
from vislens.interventions.vision import match_rows, projector_module, record_projector
from vislens.models.families import FAMILIES
from vislens.models.vlm import VLM
from vislens.toy.build import ToySpec, build_model, build_processor

TINY = ToySpec(vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, lm_hidden=32,
               lm_layers=2, lm_heads=2, lm_mlp=64)


@pytest.fixture(scope="module")
def vlm():
    return VLM(build_model(TINY).eval(), build_processor(TINY), "llava", name="tiny")


@pytest.fixture(scope="module")
def images():
    return [s.image for s in shapesworld.generate(3, seed=5)]


def test_sources_and_baselines(vlm, images):
    feats = extract(vlm, images, ["describe this image ."] * 3, batch_size=2)
    names = {f"{k}/{ly}" for k in ("keys", "values") for ly in range(2)} | {"projector",
                                                                             "vision"}
    assert set(feats[0].sources) == names
    assert feats[0].sources["keys/1"].shape == (144, 32)
    assert feats[0].sources["vision"].shape == (144, 32)
    batch = vlm.prepare(images, ["describe"] * 3)
    emb = vlm.image_embeddings(batch)
    for f, e in zip(feats, emb, strict=True):
        assert torch.allclose(f.sources["projector"], e.float(), atol=1e-5)
        # the vision rows are exactly what the projector turns into the LM input
        again = projector_module(vlm)(f.sources["vision"][None])[0]
        assert torch.allclose(again, f.sources["projector"], atol=1e-5)
    # the grid follows the image: token k sits at row k // 12, col k % 12
    assert feats[1].rows.tolist() == (np.arange(144) // 12).tolist()


def test_match_rows_finds_permutations_and_refuses_non_copies():
    rows = torch.randn(20, 6)
    perm = torch.randperm(20)
    assert torch.equal(match_rows(rows[perm], rows), perm)
    with pytest.raises(ValueError, match="vision-encoder baseline"):
        match_rows(rows[:3] + 0.5, rows)
    # near-identical rows (a plain background) must still map to their own copy: nearest
    # distances from cdist are off by ~1e-3 relative on thousands of rows, more than the
    # gap between such rows (toy-qwen's study failed on this)
    g = torch.Generator().manual_seed(0)
    many = torch.randn(1, 128, generator=g) + 1e-4 * torch.randn(3000, 128, generator=g)
    perm = torch.randperm(3000, generator=g)
    assert torch.equal(match_rows(many[perm], many), perm)


def test_projector_record_ties_merged_rows():
    class Merge(torch.nn.Module):  # 4 rows -> 1, like Qwen's 2x2 merger
        def forward(self, x):
            return x.view(-1, 4 * x.shape[-1]).sum(-1, keepdim=True).repeat(1, 3)

    class Fake:
        model_type = "qwen2_5_vl"
        family = FAMILIES["qwen2_5_vl"]
        model = torch.nn.Module()

    fake = Fake()
    fake.model.model = torch.nn.Module()
    fake.model.model.visual = torch.nn.Module()
    fake.model.model.visual.merger = Merge()
    with record_projector(fake) as rec:
        fake.model.model.visual.merger(torch.arange(16.0).view(8, 2))
    vision, projected = rec.rows()
    assert vision.shape == (2, 8) and projected.shape == (2, 3)
    assert vision[1].tolist() == list(range(8, 16))


def test_text_columns_and_prefix(vlm, images):
    prompt = "circle square"
    batch = vlm.prepare(images[:2], [prompt, "the red circle"], prefixes=["what shape", None])
    ids = batch.input_ids
    circle = vlm.tokenizer.convert_tokens_to_ids("circle")
    square = vlm.tokenizer.convert_tokens_to_ids("square")
    cols = text_columns(vlm, batch, 0, prompt, (7, 13))
    assert ids[0, cols].tolist() == [square]
    cols = text_columns(vlm, batch, 1, "the red circle", (8, 14))
    assert ids[1, cols].tolist() == [circle]
    # the prefix sits before the image tokens, the prompt after them
    what = vlm.tokenizer.convert_tokens_to_ids("what")
    image_start = batch.token_map.image_positions(0).min()
    where = (ids[0] == what).nonzero().flatten().tolist()
    assert where and max(where) < image_start
    assert (ids[1] == what).sum() == 0


def test_prefix_changes_image_values_question_does_not(vlm, images):
    def values(prompt, prefix):
        return extract(vlm, images[:1], [prompt], sources=("values",),
                       prefixes=[prefix])[0].sources["values/1"]

    base = values("describe this image .", None)
    assert torch.allclose(base, values("what is the color ?", None), atol=1e-5)
    assert not torch.allclose(base, values("describe this image .", "red circle"), atol=1e-3)


def test_blocked_keys_change_text_not_image(vlm, images):
    spans = [[(0, 6)]]
    clean = extract(vlm, images[:1], ["circle"], spans=spans, sources=("values",))[0]
    cells = KeyCells.of(clean, np.arange(0, 144, 3))
    knocked = extract(vlm, images[:1], ["circle"], spans=spans, sources=("values",),
                      blocked={0: cells})[0]
    assert torch.allclose(clean.sources["values/1"], knocked.sources["values/1"], atol=1e-6)
    assert torch.allclose(clean.text[0]["values/0"], knocked.text[0]["values/0"], atol=1e-6)
    # layer-1 values of the text read layer-0 attention outputs, which lost the keys
    assert not torch.allclose(clean.text[0]["values/1"], knocked.text[0]["values/1"], atol=1e-4)


def test_qwen_vision_rows_follow_window_order():
    """Qwen2.5-VL runs its merger in window order and undoes it after; the vision rows
    must come back in LM order (several 4x4-token windows: 9 x 7 tokens here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers_models import build

    model, proc = build("qwen2_5_vl")
    qwen = VLM(model.eval(), proc, "qwen2_5_vl")
    image = shapesworld.generate(1, seed=2)[0].image.resize((252, 196))
    f = extract(qwen, [image], ["describe this image ."])[0]
    assert f.sources["projector"].shape[0] == 63
    merged = f.sources["vision"].view(-1, f.sources["vision"].shape[1] // 4)
    again = projector_module(qwen)(merged.to(model.dtype)).float()
    assert torch.allclose(again, f.sources["projector"], atol=1e-5)
    # rows are not in window order: window order would differ from LM order here
    with record_projector(qwen) as rec:
        qwen.image_embeddings(qwen.prepare([image], ["describe"]))
    assert not torch.allclose(rec.rows()[1].float(), f.sources["projector"], atol=1e-5)


def test_text_tasks_batched_equal_one_by_one(vlm):
    """Left padding in a shared batch must not change any item's scores."""
    from vislens.data.tasks import referring_expressions
    from vislens.experiments.perception.perceive import PerceiveConfig, score_text_items

    refs = referring_expressions(3, seed=4)
    assert len({len(r.expression.split()) for r in refs}) > 1  # different lengths: padding
    config = PerceiveConfig(batch_size=3)
    together = score_text_items("ref-seg", vlm, refs, config, None)
    alone = [score_text_items("ref-seg", vlm, [r], config, None)[0] for r in refs]
    for (_, a), (_, b) in zip(together, alone, strict=True):
        assert a.keys() == b.keys() and "token" in a  # pixel level at the top, token below
        for level_a, level_b in ((a, b), (a["token"], b["token"])):
            for src in level_a:
                if src != "token":
                    assert level_a[src] == pytest.approx(level_b[src], abs=1e-6, nan_ok=True)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_families_get_vision_rows(family):
    """Tiles, unpadding and newline slots: every patch token still finds its vision row."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers_models import build

    model, proc = build(family)
    vlm = VLM(model.eval(), proc, family)
    image = shapesworld.generate(1, seed=1)[0].image.resize((200, 150))
    f = extract(vlm, [image], ["describe this image ."], layers=[0])[0]
    assert set(f.tiles.tolist()) == {0, 1}
    again = projector_module(vlm)(f.sources["vision"][None].to(model.dtype))[0].float()
    assert torch.allclose(again, f.sources["projector"], atol=1e-5)


def test_text_feature_of_a_span_is_its_mean_or_its_last_token(vlm, images):
    """--text-token last: the span's last token (the secondary summaries' "final token");
    the mean of the span's tokens by default."""
    prompt = "the red shape"
    whole, last_word = [(0, len(prompt))], [(len(prompt) - len("shape"), len(prompt))]

    def text(spans, **kw):
        f = extract(vlm, images[:1], [prompt], spans=[spans], layers=[1],
                    sources=("values",), **kw)
        return f[0].text[0]["values/1"]

    last = text(whole, text_token="last")
    assert torch.equal(last, text(last_word))  # one token: its mean is itself
    assert not torch.allclose(text(whole), last)
    with pytest.raises(ValueError, match="text_token"):
        text(whole, text_token="first")
