"""B1 as the papers' benchmarks score it: one stratified split shared by every source,
scores at pixel level (token level as a labelled variant), sem-seg choosing among the
data set's classes (present classes = oracle), chance levels and item counts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vislens.data.samples import FewShotEpisode, Sample, SemanticMap
from vislens.data.shapesworld import SHAPES
from vislens.experiments.perception import metrics as M
from vislens.experiments.perception import perceive as P
from vislens.experiments.perception.features import ImageFeatures
from vislens.experiments.stats import selection_split
from vislens.models.geometry import Layout
from vislens.models.tokenmap import ImageTokenMap


def fake_features(sources, size=16, cell=4, cols=None, text=()):
    """ImageFeatures of one size x size image read as a grid of cell-px tokens (the first
    `cols` columns only: the rest of the image is seen by no token)."""
    n = size // cell
    cols = n if cols is None else cols
    lay = Layout(image_size=(size, size))
    edges = np.arange(n + 1) * cell
    lay.add_grid(0, (edges[:cols], edges[1:cols + 1]), (edges[:-1], edges[1:]))
    tm = ImageTokenMap.build([lay], [np.arange(n * cols)], family="test")
    rows = tm._rows(0)
    return ImageFeatures(sources={k: torch.as_tensor(v, dtype=torch.float32)
                                  for k, v in sources.items()},
                         boxes=tm.box[rows], rows=tm.row[rows], cols=tm.col[rows],
                         tiles=tm.tile[rows], token_map=tm, index=0, text=list(text))


# ---- one split, by item, stratified by class, used by every source ----------------------------
def test_split_is_by_item_stratified_seeded_and_covers_every_item():
    classes = [SHAPES[i % len(SHAPES)] for i in range(20)]  # few_shot_episodes cycles classes
    sel, held = selection_split(classes, seed=0)
    assert sorted(sel + held) == list(range(20)) and len(sel) == len(held) == 10
    for c in SHAPES:  # every class in both halves (even / odd indices split 3 classes / 3)
        assert any(classes[i] == c for i in sel) and any(classes[i] == c for i in held)
    assert selection_split(classes, seed=0) == (sel, held)
    assert selection_split(classes, seed=1) != (sel, held)
    assert selection_split(["a"], seed=0) == ([], [0])  # one item: held out, nothing to choose
    videos = [f"vid-{i}" for i in range(20)]  # every item its own class: still seeded
    assert selection_split(videos, seed=0) != selection_split(videos, seed=1)
    assert selection_split(videos, seed=0)[1] != list(range(1, 20, 2))


def _fg(iou: float, n: int = 100) -> dict:
    return {"fg_i": round(iou * n), "fg_u": n, "bg_i": 0, "bg_u": 0}


def test_every_source_is_scored_on_the_held_out_half_and_the_layer_chosen_on_the_other():
    classes = [SHAPES[i % len(SHAPES)] for i in range(12)]
    sel, held = selection_split(classes, seed=3)
    rows = []
    for i, c in enumerate(classes):
        on_sel = i in sel
        level = {"values/0": _fg(1.0 if on_sel else 0.0),  # best on selection, 0 held out
                 "values/1": _fg(0.5), "projector": _fg(i / 20), "vision": _fg(0.3 if on_sel
                                                                                else 0.7),
                 "chance/all-foreground": _fg(0.05)}
        rows.append({"condition": "clean", "task": "fg-seg", "item": str(i), "class": c,
                     "stats": json.dumps({**level, "token": level})})
    config = P.PerceiveConfig(tasks=("fg-seg",), layers=(0, 1), sources=("values", "projector",
                                                                          "vision"), seed=3)
    e = P.summarise(rows, "clean", ("fg-seg",), 2, config)["fg-seg"]
    assert e["split"]["heldout"] == [str(i) for i in held]
    assert (e["n"], e["n_selection"], e["n_heldout"]) == (12, 6, 6)
    expect = M.fg_seg_score([_fg(i / 20) for i in held], [classes[i] for i in held])
    assert e["projector"] == pytest.approx(expect, abs=1e-4)
    assert e["vision"] == pytest.approx(0.7) and e["chance"] == {"all-foreground": 0.05}
    assert e["values"] == [0.0, 0.5]  # the curve is the held-out half too
    assert e["selected"]["values"] == {"layer": 0, "score": 0.0, "ci95": [0.0, 0.0], "n": 6,
                                       "n_selection": 6}
    assert e["upper_bound"]["values"]["layer"] == 1  # best on the scored half: optimistic
    assert e["level"] == "pixel" and e["token_level"]["level"] == "token"
    assert e["token_level"]["selected"]["values"]["layer"] == 0


# ---- pixel level ------------------------------------------------------------------------------
def _episode(mask):
    img = Image.new("RGB", (16, 16))
    s = Sample("x", img)
    return FewShotEpisode("circle", [s] * 5, [mask] * 5, [s], [mask])


def test_fg_seg_is_scored_on_pixels_with_the_token_score_beside_it(monkeypatch):
    mask = np.zeros((16, 16), bool)
    mask[:6, :6] = True  # covers token (0,0) wholly and half of (0,1) and (1,0): 3 fg tokens
    f = fake_features({})
    labels = M.token_labels(f.coverage(mask))
    assert labels.sum() == 3
    x = np.stack([labels, ~labels], 1).astype(float) + 0.01 * np.arange(16)[:, None]
    feats = [fake_features({"projector": x}) for _ in range(6)]
    monkeypatch.setattr(P, "_extract", lambda *a, **k: feats)
    _, stats = P.score_fg_seg(None, _episode(mask), P.PerceiveConfig(), None)
    assert stats["token"]["projector"]["fg_i"] == stats["token"]["projector"]["fg_u"] == 3
    pix = stats["projector"]  # 3 tokens of 16 px painted vs a 36 px object
    assert (pix["fg_i"], pix["fg_u"]) == (32, 52)
    assert pix["fg_u"] + pix["bg_i"] == 16 * 16  # every pixel scored once
    assert stats["chance/all-foreground"]["fg_i"] == 36
    assert stats["chance/all-foreground"]["fg_u"] == 256


def test_pixels_no_token_sees_count_as_background(monkeypatch):
    mask = np.zeros((16, 16), bool)
    mask[:4, 12:] = True  # wholly in the strip no token covers
    mask[:4, :4] = True
    labels = M.token_labels(fake_features({}, cols=3).coverage(mask))
    assert labels.tolist() == [True] + [False] * 11
    x = np.stack([labels, ~labels], 1).astype(float) + 0.01 * np.arange(12)[:, None]
    feats = [fake_features({"projector": x}, cols=3) for _ in range(6)]
    monkeypatch.setattr(P, "_extract", lambda *a, **k: feats)
    _, stats = P.score_fg_seg(None, _episode(mask), P.PerceiveConfig(), None)
    assert stats["token"]["projector"]["fg_i"] == stats["token"]["projector"]["fg_u"] == 1
    pix = stats["projector"]  # the strip's 16 object pixels: background, missed
    assert (pix["fg_i"], pix["fg_u"], pix["fg_u"] + pix["bg_i"]) == (16, 32, 256)


# ---- sem-seg: the data set's classes; the present ones are an oracle --------------------------
def _semantic_map():
    labels = np.zeros((16, 16), np.int32)
    labels[:8, :8] = 1  # a circle over 4 whole tokens
    classes = ["background", "circle", "square", "star"]
    return SemanticMap(Sample("s", Image.new("RGB", (16, 16))), classes, labels)


def test_sem_seg_prompt_names_every_class_of_the_data_set():
    sm = _semantic_map()
    _, prompt, spans, _ = P._text_request("sem-seg", sm, P.PerceiveConfig(), ())
    assert [prompt[a:b] for a, b in spans] == sm.classes  # square and star are absent


def test_sem_seg_chooses_among_all_classes_the_oracle_among_present_ones():
    sm = _semantic_map()
    probe = fake_features({})
    circle = M.token_labels(probe.coverage(sm.labels == 1))
    x = np.zeros((16, 4))
    x[~circle, 0] = 1.0
    x[circle] = [0.0, 0.5, 1.0, 0.0]  # nearer "square" (absent) than "circle"
    text = [{"values/0": torch.eye(4)[i]} for i in range(4)]
    f = fake_features({"values/0": x}, text=text)
    cls, stats = P._sem_seg_stats(sm, f)
    assert cls == "circle"
    free, oracle = stats["values/0"]["free"], stats["values/0"]["oracle"]
    assert M.semseg_score([free]) == pytest.approx(1 / 3)  # bg right, circle -> square
    assert M.semseg_score([oracle]) == 1.0
    assert stats["chance/all-background"]["free"] == {"background": [192, 256],
                                                               "circle": [0, 64]}





def test_sem_seg_dot_product_weighs_the_text_features_norms():
    """--similarity dot: a class name with a long text feature wins where cosine ties."""
    sm = _semantic_map()
    x = np.zeros((16, 4))
    x[:, 0] = 1.0
    x[:, 1] = 1.0  # every token equally near "background" and "circle" by angle
    text = [{"values/0": torch.eye(4)[i] * (3.0 if i == 1 else 1.0)} for i in range(4)]
    f = fake_features({"values/0": x}, text=text)
    _, cos = P._sem_seg_stats(sm, f)
    _, dot = P._sem_seg_stats(sm, f, "dot")
    assert set(cos["values/0"]["free"]) == {"background", "circle"}
    assert cos["values/0"]["free"]["circle"][0] == 0  # the tie goes to background
    assert dot["values/0"]["free"]["circle"] == [64, 256]  # the long "circle" text wins

