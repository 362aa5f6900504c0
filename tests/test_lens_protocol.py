"""A2 as Neo et al. counted it: which tokens are a class's, which patches are the
object's, which images (one large object), and every residual decoded with one norm."""

import numpy as np
import pytest
import torch

from vislens.cli import image_inputs
from vislens.data import shapesworld
from vislens.data.answers import head_words
from vislens.experiments import logit_lens
from vislens.interventions import capture
from vislens.models.vlm import VLM
from vislens.runs.rundir import RunDir
from vislens.toy.build import build_model, build_processor


@pytest.fixture(scope="module")
def tokenizers():
    """Real-kind subword tokenizers: SentencePiece (LLaVA-1.5), byte-level BPE (Llama 3,
    Qwen2.5), as the look-alikes of tests/lookalikes/ ship them."""
    from lookalikes import LLAVA15, NEXT, QWEN25VL, checkpoint_dir
    from transformers import AutoTokenizer

    return {n: AutoTokenizer.from_pretrained(str(checkpoint_dir(n)))
            for n in (LLAVA15, NEXT, QWEN25VL)}


def _first(tok, text):
    """The first non-blank piece of `text` as the tokenizer encodes it."""
    ids = tok.encode(text, add_special_tokens=False)
    return next(i for i in ids if tok.decode([i]).strip())


def test_head_words():
    light = head_words("traffic light")  # synonyms: the COCO list of answers.py
    assert {"light", "lights", "signal", "stoplight"} <= set(light)
    assert "traffic" not in light
    assert head_words("hot dog") == ["dog", "dogs"]
    assert "phone" in head_words("cell phone") and "cell" not in head_words("cell phone")
    assert head_words("red circle") == ["circle", "circles"]  # ShapesWorld: the shape


@pytest.mark.lookalike
def test_class_tokens_are_the_head_words_first_pieces(tokenizers):
    for name, tok in tokenizers.items():
        light = logit_lens.word_ids(tok, "traffic light")
        assert {_first(tok, "light"), _first(tok, " light"), _first(tok, " signal")} <= \
            set(light), name
        assert not {_first(tok, "traffic"), _first(tok, " traffic")} & set(light), name
        dog = logit_lens.word_ids(tok, "hot dog")
        assert set(dog) == {_first(tok, t) for t in ("dog", " dog", "dogs", " dogs")}, name
        assert not {_first(tok, "hot"), _first(tok, " hot")} & set(dog), name
        phone = logit_lens.word_ids(tok, "cell phone")
        assert {_first(tok, " phone"), _first(tok, " smartphone"), _first(tok, "phones")} <= \
            set(phone), name
        # a word split into pieces counts by its first piece only ("gir" of "gir|affe")
        giraffe = logit_lens.word_ids(tok, "giraffe")
        assert set(giraffe) == {_first(tok, t) for t in ("giraffe", " giraffe", "giraffes",
                                                         " giraffes")}, name
        pieces = tok.encode(" giraffe", add_special_tokens=False)
        assert len(pieces) > 2 and not set(pieces[2:]) & set(giraffe), name
        assert not any(tok.decode([i]).strip() == "" for i in giraffe + dog + light)


def _table(cover, hit, bg, n_layers):
    import pyarrow as pa

    hit = np.array(hit, dtype=bool)
    return pa.table({"sample": ["s"] * len(cover), "coverage": [float(c) for c in cover],
                     "background": bg, "hit": logit_lens._lists(hit),
                     "class_prob": logit_lens._lists(hit.astype(np.float32))})


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return VLM(build_model(seed=3).eval(), build_processor(), "llava", name="untrained")


def test_object_patches_are_any_overlap(untrained, tmp_path):
    """As A1 and Neo et al.'s utils.find_overlapping_patches: a patch the mask touches at
    all is an object patch (a 10% sliver too), not only one half covered."""
    n = untrained.num_layers + 1
    rows = [[la == 2 for la in range(n)], [False] * n, [la == 1 for la in range(n)]]
    table = _table([0.1, 1.0, 0.0], rows, [False, False, True], n)
    assert logit_lens.LensConfig().object_coverage == 0.0
    s = logit_lens.summarise([table], untrained, logit_lens.LensConfig(), tmp_path)
    assert s["n_object_patches"] == 2 and s["hit_rate"] == 0.5
    assert s["background_rate"] == 1.0 and s["n_background_patches"] == 1
    assert "any overlap" in s["hit_rule"] and "top-5" in s["hit_rule"]
    half = logit_lens.summarise([table], untrained, logit_lens.LensConfig(object_coverage=0.5),
                                tmp_path)
    assert half["n_object_patches"] == 1 and half["hit_rate"] == 0.0


def test_default_images_by_source(untrained, tmp_path):
    """Without an area the lens takes Neo et al.'s COCO range (20000-30000 px^2) on COCO
    and the large shapes (>= 350 px^2) on ShapesWorld; the CLI's defaults agree."""
    coco = [shapesworld.generate(1, seed=5)[0]]
    coco[0].meta = {**coco[0].meta, "source": "coco"}
    assert logit_lens.default_area(coco) == (20000.0, 30000.0)
    assert image_inputs.AREAS["large"]["coco"] == logit_lens.AREAS["coco"]
    assert image_inputs.AREAS["large"]["shapesworld"] == logit_lens.AREAS["shapesworld"]
    scenes = shapesworld.generate(6, seed=11)
    run = RunDir(tmp_path, {"t": 1}, key=["sample"])
    s = logit_lens.run(untrained, scenes, logit_lens.LensConfig(viewers=0), run)
    assert s["area"] == [350.0, None]
    chosen = {r["sample"]: r["target"] for r in run.rows()}
    for scene in scenes:
        if scene.id in chosen:
            inst = [i for i in scene.instances if i.name == chosen[scene.id]][0]
            assert inst.area >= 350
    assert len(chosen) < len(scenes)  # some scenes hold no large shape: left out


def test_cli_area_neo_is_coco_only(tmp_path):
    from typer.testing import CliRunner

    from vislens.cli import app

    out = tmp_path / "lens"
    bad = CliRunner().invoke(app, ["logit-lens", "--area", "neo", "--out", str(out)])
    assert bad.exit_code == 2 and "coco" in bad.output.lower() and not out.exists()


def test_every_residual_once_normed():
    """State 0 is the LM's input embeddings and state L the last layer's output before the
    final norm, so decoding it (norm once) gives the model's own logits; HF's
    hidden_states[-1] is already normed, and norming it again (as lvlm_lens.py:30-35 does)
    gives other numbers once the norm has a gain (trained norms do; an untrained one's
    weight of 1 makes RMSNorm idempotent)."""
    torch.manual_seed(0)
    untrained = VLM(build_model(seed=3).eval(), build_processor(), "llava", name="untrained")
    with torch.no_grad():
        untrained.final_norm.weight.uniform_(0.5, 2.0)
    scene = shapesworld.generate(1, seed=11)[0]
    batch = untrained.prepare([scene.image], [logit_lens.PROMPT])
    pos = [batch.token_map.image_positions(0)]
    with capture(untrained, pos, residual=True) as cap:
        out = untrained.forward(batch, output_hidden_states=True)
    L = untrained.num_layers
    hs = out.hidden_states
    p = torch.as_tensor(pos[0])
    torch.testing.assert_close(cap.of("residual", 0, 0), hs[0][0, p])
    torch.testing.assert_close(untrained.unembed(cap.of("residual", L, 0)),
                               out.logits[0, p], rtol=1e-4, atol=1e-4)
    twice = untrained.unembed(hs[L][0, p])
    assert not torch.allclose(twice, out.logits[0, p], atol=1e-3)
