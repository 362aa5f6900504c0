"""Protocol defects found by reading the code against docs/sources/PROTOCOLS.md; each test
failed before its fix (the fixture-based ones live in test_lookalikes_e2e.py)."""

import json

import numpy as np
import pytest
import torch
from helpers_models import build, save
from PIL import Image

from vislens.data import answers, shapesworld
from vislens.data.samples import Question
from vislens.experiments import ablation
from vislens.experiments.perception.features import KeyCells, block_keys, extract
from vislens.experiments.prompts import answer_span, region
from vislens.interventions import capture
from vislens.models.vlm import VLM


def make(family: str) -> VLM:
    model, proc = build(family)
    return VLM(model, proc, family)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_keys_do_not_depend_on_the_batch(family):
    """Post-RoPE keys of an image are the same alone and left-padded beside a longer prompt
    (forward used to count positions from the first pad)."""
    vlm = make(family)
    image = Image.new("RGB", (300, 200), (120, 40, 30))
    alone = vlm.prepare([image], ["what"])
    padded = vlm.prepare([image, image],
                         ["what", "is there a red circle in this image ? describe this image ."])
    assert int((padded.attention_mask[0] == 0).sum()) > 0  # row 0 really is padded
    got = []
    for batch in (alone, padded):
        with capture(vlm, [batch.token_map.image_positions(0)], keys=True,
                     residual=False) as cap:
            vlm.forward(batch)
        got.append({k: v.clone() for k, v in cap.keys_post.items()})
    for layer in got[0]:
        torch.testing.assert_close(got[0][layer], got[1][layer], rtol=0, atol=1e-5)


def test_pre_rope_keys_are_a_source_and_ignore_position():
    vlm = make("llava")
    image = Image.new("RGB", (200, 200), (10, 90, 200))
    plain = extract(vlm, [image], ["what"], layers=[0], sources=("keys", "keys-pre"))[0]
    shifted = extract(vlm, [image], ["what"], layers=[0], sources=("keys", "keys-pre"),
                      prefixes=["a long text before the image ."])[0]
    torch.testing.assert_close(plain.sources["keys-pre/0"], shifted.sources["keys-pre/0"],
                               rtol=0, atol=1e-5)
    assert not torch.allclose(plain.sources["keys/0"], shifted.sources["keys/0"], atol=1e-3)


def test_integrated_gradients_leave_weights_alone_and_chunk_exactly():
    vlm = make("llava")
    one = vlm.prepare([Image.new("RGB", (336, 336), (200, 10, 10))], ["what"])
    feats = vlm.image_embeddings(one)
    vec = feats[0].mean(0)
    flags = {n: p.requires_grad for n, p in vlm.model.named_parameters()}
    whole = ablation.integrated_gradients(vlm, one, feats, 5, vec, steps=6, chunk=6)
    parts = ablation.integrated_gradients(vlm, one, feats, 5, vec, steps=6, chunk=4)
    np.testing.assert_allclose(whole, parts, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in vlm.model.parameters())
    assert {n: p.requires_grad for n, p in vlm.model.named_parameters()} == flags
    assert any(flags.values())


def _decode(pieces):
    return lambda ids: "".join(pieces[i] for i in ids)


@pytest.mark.parametrize("pieces, q, span", [
    (["A", " gir", "affe", " eating", "."],
     Question("generative", "", "giraffe", target_name="giraffe"), (1, 3)),
    ([" Yes", ",", " there"], Question("polling", "", "yes"), (0, 1)),
    ([" a", " gir", "affe", "."], Question("vqa", "", "giraffe"), (1, 3)),
    ([" a", " cat", "ch", " and", " a", " cat"],
     Question("generative", "", "cat", target_name="cat"), (5, 6)),
    ([" two", " gir", "affes"], Question("generative", "", "giraffe", target_name="giraffe"),
     (1, 3)),
    ([" a", " dog"], Question("vqa", "", "giraffe"), None),
])
def test_answer_span_is_found_token_by_token(pieces, q, span):
    assert answer_span(_decode(pieces), list(range(len(pieces))), q) == span


def test_answers_accept_plurals_synonyms_and_articles():
    assert answers.mentions("Two giraffes are standing.", "giraffe")
    assert answers.mentions("a man rides a motorbike", "motorcycle")
    assert answers.mentions("A TRAFFIC LIGHT at night", "traffic light")
    assert answers.mentions("a hairdryer", "hair drier")  # CHAIR lists no "hair dryer"
    assert not answers.mentions("they play catch", "cat")
    assert answers.starts_with("an apple.", "apple")
    assert answers.starts_with("a sofa", "couch")
    assert not answers.starts_with("a dog and a cat", "cat")
    assert answers.first_word("Yes, there is.", "yes")
    assert not answers.first_word("No.", "yes")
    assert answers.plural("bus") == "buses" and answers.plural("person") == "people"


def test_coco_vqa_question_points_at_the_target_without_naming_it():
    from vislens.experiments.prompts import question

    sample = shapesworld.generate(1, seed=3)[0]
    sample.meta = {"source": "coco"}
    q = question(sample, 0, "vqa")
    box = sample.instances[0].box
    assert region(box, sample.image.size) in q.prompt
    assert sample.instances[0].name not in q.prompt
    assert region((0, 0, 10, 10), (100, 100)) == "top left"
    assert region((40, 40, 60, 60), (100, 100)) == "center"


def _flagged(feature, idx):
    return KeyCells.of(feature, np.asarray(idx))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_artifact_cells_map_by_place_on_another_grid(family):
    """Keys flagged on one image size block the same PLACE on another size, not the same
    index in token order (which is another cell there)."""
    vlm = make(family)
    small, wide = Image.new("RGB", (336, 336)), Image.new("RGB", (900, 300))
    f = extract(vlm, [small], ["what"], layers=[0], sources=("values",))[0]
    tm = f.token_map
    last_tile = int(f.tiles.max())
    idx = np.flatnonzero(f.tiles == last_tile)[[0, -1]]  # first and last cell of the grid
    cells = _flagged(f, idx)
    same = cells.positions(tm, 0)
    assert np.array_equal(same, tm.image_positions(0)[idx])
    other = vlm.prepare([wide], ["what"]).token_map
    mapped = other.cells(cells.positions(other, 0), 0)
    (r0, c0), (r1, c1) = tm.grids[0][last_tile], other.grids[0][last_tile]
    assert (r0, c0) != (r1, c1)
    for (_, r, c), (t, rr, cc) in zip(tm.cells(same, 0), mapped, strict=True):
        assert t == last_tile  # the same place: centres within half a target cell
        assert abs((rr + 0.5) / r1 - (r + 0.5) / r0) <= 0.5 / r1
        assert abs((cc + 0.5) / c1 - (c + 0.5) / c0) <= 0.5 / c1
    by_index = other.cells(other.image_positions(0)[idx], 0)
    assert [tuple(c) for c in by_index] != [tuple(c) for c in mapped]


def test_block_keys_blocks_the_mapped_cells():
    vlm = make("qwen2_5_vl")
    f = extract(vlm, [Image.new("RGB", (336, 336))], ["what"], layers=[0],
                sources=("values",))[0]
    cells = _flagged(f, [0, 5])
    batch = vlm.prepare([Image.new("RGB", (500, 300))], ["what"])
    with block_keys(vlm, batch, {0: cells}), capture(
            vlm, [[]], attention_queries=[[batch.seq_len - 1]], layers=[0]) as cap:
        vlm.forward(batch)
    att = cap.attention[0][0]  # [heads, keys]
    blocked = cells.positions(batch.token_map, 0)
    assert len(blocked) == 2 and float(att[:, blocked].abs().max()) == 0.0
    others = np.setdiff1d(batch.token_map.image_positions(0), blocked)
    assert float(att[:, others].min()) > 0


def test_dtype_defaults_to_the_saved_one_and_rejects_unknown_names(tmp_path):
    from vislens.models import load

    path = save("llava", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    assert load(str(path)).dtype == torch.bfloat16
    assert load(str(path), dtype="float32").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        load(str(path), dtype="banana")
