"""Memory that grows with what is asked: perceive's features go to disk layer by layer and
come back one source at a time with the very numbers the all-in-memory float32 path gave;
the mean-embedding reference set is read lazily, a batch at a time.

(The logit lens' columnar storage is tested in test_part_a.py beside the lens.)
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from lookalikes import NEXT, checkpoint_dir

import vislens
from vislens.data import shapesworld
from vislens.experiments.perception import features as F
from vislens.experiments.perception import perceive
from vislens.interventions import capture
from vislens.interventions.vision import record_projector, vision_rows
from vislens.models.vlm import VLM
from vislens.runs.rundir import RunDir
from vislens.toy.build import ToySpec, build_model, build_processor

TINY = ToySpec(vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, lm_hidden=32,
               lm_layers=2, lm_heads=2, lm_mlp=64)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VLM(build_model(TINY).eval(), build_processor(TINY), "llava", name="tiny")


# ---- the reference: every layer of every image kept in memory in float32 (the old path) -------
@torch.no_grad()
def in_memory_extract(vlm, images, prompts, spans=None, layers=None, sources=F.SOURCES,
                      prefixes=None, blocked=None, batch_size=8, text_token="mean"):
    """What features.extract returned before the store: per image a dict of float32 tensors
    of every source, all layers captured in one table and kept (text spans: their mean)."""
    assert text_token == "mean"
    images, prompts = list(images), list(prompts)
    spans = [list(s) for s in spans] if spans is not None else [[] for _ in images]
    prefixes = list(prefixes) if prefixes is not None else [None] * len(images)
    out = []
    for i in range(0, len(images), batch_size):
        sl = slice(i, i + batch_size)
        out.extend(_in_memory_batch(vlm, images[sl], prompts[sl], spans[sl], layers, sources,
                                    prefixes[sl], blocked))
    return out


def _in_memory_batch(vlm, images, prompts, spans, layers, sources, prefixes, blocked):
    batch = vlm.prepare(list(images), list(prompts), prefixes=prefixes)
    tm, n = batch.token_map, batch.size
    image_pos = [tm.image_positions(b) for b in range(n)]
    text_pos = [[F.text_columns(vlm, batch, b, prompts[b], s) for s in spans[b]]
                for b in range(n)]
    positions = [np.concatenate([image_pos[b], *text_pos[b]]) if text_pos[b] else image_pos[b]
                 for b in range(n)]
    want_kv = any(s in sources for s in F.LM_KINDS)
    lm_layers = list(range(vlm.num_layers)) if layers is None else [int(x) for x in layers]
    with ExitStack() as stack:
        rec = stack.enter_context(record_projector(vlm)) if "vision" in sources else None
        stack.enter_context(F.block_keys(vlm, batch, blocked))
        kv = stack.enter_context(capture(
            vlm, positions, layers=lm_layers, residual=False,
            keys="keys" in sources or "keys-pre" in sources, values="values" in sources)) \
            if want_kv else None
        emb = stack.enter_context(capture(vlm, positions, layers=[0], residual=True))
        vlm.forward(batch, logits_to_keep=1)
    vision = None
    if rec is not None:
        lm_in = [emb.of("residual", 0, b)[:len(image_pos[b])] for b in range(n)]
        vision = torch.split(vision_rows(torch.cat(lm_in), rec).float().cpu(),
                             [len(p) for p in image_pos])
    feats = []
    for b in range(n):
        per = {}
        if kv is not None:
            for layer in lm_layers:
                for kind, table in F.LM_KINDS.items():
                    if kind in sources:
                        x = kv.of(table, layer, b)
                        per[f"{kind}/{layer}"] = x.reshape(x.shape[0], -1).float().cpu()
        per["projector"] = emb.of("residual", 0, b).float().cpu()
        if vision is not None:
            per["vision"] = vision[b]
        texts, start = [], len(image_pos[b])
        for cols in text_pos[b]:
            texts.append({k: v[start:start + len(cols)].mean(0) for k, v in per.items()
                          if k != "vision"})
            start += len(cols)
        image = {k: v[:len(image_pos[b])] for k, v in per.items()}
        if "projector" not in sources:
            image.pop("projector")
        rows = tm._rows(b)
        feats.append(F.ImageFeatures(sources=image, boxes=tm.box[rows], rows=tm.row[rows],
                                     cols=tm.col[rows], tiles=tm.tile[rows], token_map=tm,
                                     index=b, text=texts))
    return feats


def assert_same_features(got, want):
    """Bit for bit: the same sources in the same order, equal tensors, equal text features."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert list(g.sources) == list(w.sources)
        for name in w.sources:
            a, b = g.sources[name], w.sources[name]
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
        assert [list(t) for t in g.text] == [list(t) for t in w.text]
        for tg, tw in zip(g.text, w.text, strict=True):
            for name in tw:
                assert torch.equal(tg[name], tw[name]), name
        np.testing.assert_array_equal(g.boxes, w.boxes)


def test_stored_features_equal_the_in_memory_float32_path(tiny):
    """Every source (keys before and after RoPE, values, projector, vision) of three images
    in two batches, with text spans: what comes back from disk is exactly what the
    all-layers float32 path held in memory."""
    images = [s.image for s in shapesworld.generate(3, seed=5)]
    prompts = ["describe this image .", "a red circle", "segment the image into : sky"]
    spans = [[(0, 8)], [(2, 5), (6, 12)], []]
    args = dict(spans=spans, sources=F.ALL_SOURCES, batch_size=2)
    got = F.extract(tiny, images, prompts, **args)
    assert_same_features(got, in_memory_extract(tiny, images, prompts, **args))
    store = got[0].sources.store
    assert isinstance(got[0].sources, F.StoredSources) and got[2].sources.store is store
    # only the asked-for sources are written: 3 images x (3 kinds x 2 layers + 2) x 144 x 32
    assert store.nbytes == 3 * 8 * 144 * 32 * 4
    one = F.extract(tiny, images[:1], prompts[:1], layers=[1], sources=("values",))
    assert list(one[0].sources) == ["values/1"]
    assert one[0].sources.store.nbytes == 144 * 32 * 4


@pytest.mark.lookalike
def test_stored_features_keep_bf16_bits_on_a_real_geometry():
    """The NeXT look-alike (2340 image-token ids, anyres tiles, one kv head) in bfloat16:
    rows are stored in bf16 (half the bytes of float32) and read back equal to the float32
    conversion the in-memory path made, batched as alone."""
    vlm = vislens.load(str(checkpoint_dir(NEXT)), dtype="bfloat16")
    images = [s.image for s in shapesworld.generate(2, seed=8)]
    prompts = ["describe this image .", "find the red circle ."]
    spans = [[(0, 8)], [(9, 19)]]
    got = F.extract(vlm, images, prompts, spans=spans, sources=F.ALL_SOURCES, batch_size=2)
    assert_same_features(got, in_memory_extract(vlm, images, prompts, spans=spans,
                                                sources=F.ALL_SOURCES, batch_size=2))
    store = got[0].sources.store
    elements = sum(got[b].sources[name].numel() for b in range(2) for name in got[b].sources)
    assert store.nbytes == 2 * elements


@pytest.mark.slow
def test_perceive_scores_equal_the_in_memory_path(tiny, tmp_path, monkeypatch):
    """All six tasks scored from the store give the summary the in-memory float32 features
    give (same numbers, not within a tolerance: the features are the same bits)."""
    config = perceive.PerceiveConfig(n=2, batch_size=2)
    stored = perceive.run(tiny, config, RunDir(tmp_path / "a", {}, ["condition", "task", "item"]))
    monkeypatch.setattr(perceive, "extract", in_memory_extract)
    memory = perceive.run(tiny, config, RunDir(tmp_path / "b", {}, ["condition", "task", "item"]))
    assert stored == memory
    assert set(stored) >= set(perceive.TASKS)


@pytest.mark.slow
def test_one_source_of_an_item_in_memory_at_a_time(tiny, tmp_path, monkeypatch):
    """While a task scores an item (a 5+1-shot episode, a set of 4, a video of 8 frames, a
    pair), each read of a source finds at most one OTHER source's features still alive:
    memory is (images of the item x tokens x one layer), not x every layer and kind."""
    alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
    seen, counter = [], iter(range(10**9))
    read = F.FeatureStore.read

    def spy(self, image, name):
        others = {key[1] for key in alive.keys() if key[1] != name}
        seen.append(len(others))
        x = read(self, image, name)
        alive[(id(self), name, image, next(counter))] = x
        return x

    monkeypatch.setattr(F.FeatureStore, "read", spy)
    config = perceive.PerceiveConfig(n=2, batch_size=4,
                                     tasks=("fg-seg", "co-seg", "sem-corr", "temp-corr"),
                                     sources=("keys", "keys-pre", "values", "projector",
                                              "vision"))
    perceive.run(tiny, config, RunDir(tmp_path, {}, ["condition", "task", "item"]))
    n_sources = 3 * tiny.num_layers + 2
    assert len(seen) > n_sources and max(seen) <= 1 < n_sources - 1


def test_capture_sink_hands_over_each_layer_and_keeps_none(tiny):
    """With a sink, keys / values reach it once per layer and kind as they are computed, equal
    to what a keeping capture holds, and the capture's own tables stay empty."""
    image = shapesworld.generate(1, seed=2)[0].image
    batch = tiny.prepare([image, image], ["describe this image .", "a red circle"])
    positions = [batch.token_map.image_positions(b) for b in range(2)]
    got = []
    with torch.no_grad(), capture(tiny, positions, residual=False, keys=True, values=True,
                                  sink=lambda kind, layer, x: got.append((kind, layer, x))) \
            as sunk:
        tiny.forward(batch, logits_to_keep=1)
    with torch.no_grad(), capture(tiny, positions, residual=False, keys=True, values=True) \
            as kept:
        tiny.forward(batch, logits_to_keep=1)
    assert not sunk.keys_pre and not sunk.keys_post and not sunk.values
    assert sorted((k, ly) for k, ly, _ in got) == sorted(
        (k, ly) for k in ("keys_pre", "keys_post", "values") for ly in range(tiny.num_layers))
    for kind, layer, x in got:
        assert torch.equal(x, getattr(kept, kind)[layer])


# ---- the reference set of a mean embedding ---------------------------------------------------
def test_reference_set_is_read_a_batch_at_a_time_and_keeps_its_cache_key(tiny, tmp_path,
                                                                         monkeypatch):
    """imagenet:DIR as `ablate --reference` reads it: never more than one batch of images in
    memory (every image the loader made is watched), the same mean as the whole list, and
    the cache key of the list, so a vector cached from a list is found again."""
    from native_formats import write_image_folder

    from vislens.data import imagenet
    from vislens.data.resolve import reference_images
    from vislens.interventions import reference

    write_image_folder(tmp_path / "val", shapesworld.generate(7, seed=4))
    folder = reference_images(f"imagenet:{tmp_path / 'val'}")
    assert isinstance(folder, imagenet.ImageFolder) and len(folder) == 7
    as_list = list(folder)
    assert reference.data_key(folder) == reference.data_key(as_list)
    want = reference.mean_image_embedding(tiny, as_list, batch_size=3,
                                          cache_dir=tmp_path / "list")
    del as_list

    alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # PIL: unhashable
    loaded, held, ids = [], [], iter(range(10**9))
    read = imagenet.read_image

    def watched(path, *args, **kwargs):
        im = read(path, *args, **kwargs)
        loaded.append(1)
        alive[next(ids)] = im
        held.append(len(alive))
        return im

    prepare = tiny.prepare

    def counting(images, *args, **kwargs):
        held.append(len(alive))
        return prepare(images, *args, **kwargs)

    monkeypatch.setattr(imagenet, "read_image", watched)
    monkeypatch.setattr(tiny, "prepare", counting)
    got = reference.mean_image_embedding(tiny, folder, batch_size=3, cache_dir=tmp_path / "lazy")
    assert len(loaded) == 14  # once for the key, once for the mean
    assert max(held) <= 3
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a one-shot generator: read once, hashed as it is summed, cached under the same key
    loaded.clear()
    once = reference.mean_image_embedding(tiny, iter(folder), batch_size=3,
                                          cache_dir=tmp_path / "once")
    assert len(loaded) == 7 and max(held) <= 3 and torch.equal(once, want)
    names = {p.name for d in ("list", "lazy", "once") for p in (tmp_path / d).glob("*.pt")}
    assert len(names) == 1
    # and the lazy set finds the vector the list cached (no image is read for the mean)
    loaded.clear()
    again = reference.mean_image_embedding(tiny, folder, cache_dir=tmp_path / "list")
    assert len(loaded) == 7 and torch.equal(again, want)
    with pytest.raises(ValueError, match="at least one"):
        reference.mean_image_embedding(tiny, iter([]), cache_dir=tmp_path / "empty")
