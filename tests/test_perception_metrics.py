"""Each perception score on hand-built features with known answers: perfect
features score 1, shuffled (uninformative) features score near chance."""

import numpy as np
import pytest
from PIL import Image

from vislens.data.samples import CorrespondencePair, Sample
from vislens.experiments.perception import metrics as M
from vislens.experiments.perception.artifacts import flag

RNG = np.random.default_rng(0)


def onehot(labels, n, noise=0.0, dim=16):
    x = np.zeros((len(labels), dim))
    x[np.arange(len(labels)), labels] = 1.0
    return x + noise * RNG.normal(size=x.shape)


def blob(n=144, fg=0.1):
    y = np.zeros(n, bool)
    y[RNG.choice(n, int(n * fg), replace=False)] = True
    return y


def test_linear_probe_perfect_and_shuffled():
    support_y = [blob() for _ in range(5)]
    query_y = [blob()]
    perfect = M.fg_seg_stats([onehot(y.astype(int), 2, 0.05) for y in support_y], support_y,
                             [onehot(y.astype(int), 2, 0.05) for y in query_y], query_y)
    assert M.fg_seg_score([perfect], ["a"]) == 1.0
    shuffled = [M.fg_seg_stats([RNG.normal(size=(144, 16)) for _ in support_y], support_y,
                               [RNG.normal(size=(144, 16))], query_y) for _ in range(5)]
    # chance: fg predicted at random; its IoU with a 10% object stays far below 1
    assert M.fg_seg_score(shuffled, ["a"] * 5) < 0.25


def test_probe_balances_rare_foreground():
    y = np.zeros(400, bool)
    y[:8] = True  # 2% foreground, separable along one axis
    x = RNG.normal(size=(400, 8))
    x[:, 0] += 3 * y
    assert M.linear_probe(x, y, x)[:8].all()


def test_fg_seg_score_is_per_class_mean():
    stats = [{"fg_i": 1, "fg_u": 2, "bg_i": 0, "bg_u": 0}, {"fg_i": 3, "fg_u": 4, "bg_i": 0,
                                                            "bg_u": 0},
             {"fg_i": 0, "fg_u": 4, "bg_i": 0, "bg_u": 0}]
    # class a: (1 + 3) / (2 + 4); class b: 0
    assert M.fg_seg_score(stats, ["a", "a", "b"]) == pytest.approx((4 / 6 + 0) / 2)


def _ring(n=12) -> np.ndarray:
    r, c = np.divmod(np.arange(n * n), n)
    return (r == 0) | (c == 0) | (r == n - 1) | (c == n - 1)


def interior_blob(fg=0.2, n=12):
    y = np.zeros(n * n, bool)
    inside = np.flatnonzero(~_ring(n))
    y[RNG.choice(inside, int(n * n * fg), replace=False)] = True
    return y


def test_coseg():
    labels = [interior_blob() for _ in range(4)]
    assert not any((y & _ring()).any() for y in labels)  # objects off the border
    perfect = [onehot(y.astype(int), 2) for y in labels]
    got = M.coseg_iou(perfect, labels, k=2, borders=[_ring()] * 4)
    assert got == {"free": 1.0, "oracle": 1.0}
    shuffled = [M.coseg_iou([RNG.normal(size=(144, 16)) for _ in labels], labels, k=3,
                            seed=s, borders=[_ring()] * 4) for s in range(3)]
    assert np.mean([g["oracle"] for g in shuffled]) < 0.35  # ~1/3 of tokens vs a 20% object
    assert all(g["free"] <= g["oracle"] for g in shuffled)


def test_coseg_free_choice_ignores_the_ground_truth():
    """The free pick is the same cluster whatever the labels say; the oracle follows them."""
    labels = [interior_blob() for _ in range(4)]
    feats = [onehot(y.astype(int), 2) for y in labels]
    flipped = [~y & ~_ring() for y in labels]  # "truth" = the non-object interior
    a = M.coseg_iou(feats, labels, k=2, borders=[_ring()] * 4)
    b = M.coseg_iou(feats, flipped, k=2, borders=[_ring()] * 4)
    assert a["free"] == 1.0 and b["free"] < 0.5 and b["oracle"] > b["free"]


def test_semseg():
    gt = RNG.integers(0, 3, 144)
    text = np.eye(16)[:3]
    stats = M.semseg_stats(M.semseg_predict(onehot(gt, 3), text), gt, ["bg", "a", "b"])
    assert M.semseg_score([stats]) == 1.0
    shuffled = M.semseg_stats(M.semseg_predict(onehot(RNG.permutation(gt), 3), text), gt,
                              ["bg", "a", "b"])
    assert M.semseg_score([shuffled]) < 0.4  # chance for 3 balanced classes is 1/5
    ignored = gt.copy()
    ignored[:10] = -1
    assert M.semseg_stats(np.zeros(144, int), ignored, ["bg", "a", "b"])["bg"][1] == 134


def test_refseg():
    gt = blob(fg=0.1)
    text = np.eye(16)[1]
    assert M.refseg_iou(onehot(gt.astype(int), 2, 0.01), text, gt) == {"free": 1.0,
                                                                       "oracle": 1.0}
    shuffled = [M.refseg_iou(RNG.normal(size=(144, 16)), text, gt) for _ in range(10)]
    assert np.mean([s["oracle"] for s in shuffled]) < 0.2  # k random tokens vs a 10% object
    assert np.mean([s["free"] for s in shuffled]) < 0.3


def test_otsu_splits_two_groups():
    values = np.concatenate([RNG.normal(0, 0.05, 100), RNG.normal(1, 0.05, 20)])
    t = M.otsu_threshold(values)
    assert 0.2 < t < 0.8 and (values > t).sum() == 20


def _grid_centres(n=12, cell=8):
    r, c = np.divmod(np.arange(n * n), n)
    return np.stack([c * cell + cell / 2, r * cell + cell / 2], 1)


def test_correspondence_pck():
    centres = _grid_centres()
    src_tokens = np.array([13, 40, 77, 100])
    shift = 2 * 12 + 1  # the object moved 1 cell right, 2 down
    im = Sample("x", Image.new("RGB", (96, 96)))
    pair = CorrespondencePair("p", im, im, centres[src_tokens], centres[src_tokens + shift],
                              (0, 0, 40, 40), (0, 0, 40, 40))
    feats = RNG.normal(size=(144, 32))
    target = np.zeros_like(feats)
    target[src_tokens + shift] = feats[src_tokens]
    others = np.setdiff1d(np.arange(144), src_tokens + shift)
    target[others] = RNG.normal(size=(len(others), 32))
    match = M.nearest_tokens(feats, target, src_tokens)
    assert pair.pck(centres[match]) == 1.0
    shuffled = np.mean([pair.pck(centres[M.nearest_tokens(feats, RNG.normal(size=(144, 32)),
                                                           src_tokens)]) for _ in range(10)])
    assert shuffled < 0.1  # 1 of 144 tokens is within 4 px


def test_label_propagation_j_and_f():
    grids = []
    for t in range(4):  # a 3x3 object moving one cell per frame on a 12x12 grid
        g = np.zeros((12, 12), int)
        g[2 + t:5 + t, 3:6] = 1
        grids.append(g)
    perfect = [onehot(g.ravel(), 2) for g in grids]
    preds = M.propagate(perfect, grids[0].ravel())
    out = M.j_and_f([p.reshape(12, 12) for p in preds], grids)
    assert out == {"j": 1.0, "f": 1.0, "jf": 1.0}
    noise = [RNG.normal(size=(144, 16)) for _ in grids]
    preds = M.propagate(noise, grids[0].ravel())
    assert M.j_and_f([p.reshape(12, 12) for p in preds], grids)["jf"] < 0.5


def test_boundary_f():
    a = np.zeros((12, 12), bool)
    a[2:6, 2:6] = True
    assert M.f_measure(a, a) == 1.0
    b = np.zeros_like(a)
    b[8:11, 8:11] = True
    assert M.f_measure(a, b) == 0.0
    shifted = np.roll(a, 1, axis=1)  # one cell off: inside the 1-cell tolerance
    assert M.f_measure(shifted, a) == 1.0


def test_token_labels_threshold():
    assert M.token_labels(np.array([0.49, 0.5, 1.0])).tolist() == [False, True, True]


def test_artifact_flagging():
    scores = np.full(144, 0.3) + RNG.normal(scale=0.02, size=144)
    scores[[5, 77]] = 0.97
    assert flag(scores, z=2.0, min_score=0.9).tolist() == [5, 77]
    assert flag(scores, z=2.0, min_score=0.99).tolist() == []


def test_input_agnostic_score():
    import torch

    from vislens.experiments.perception.artifacts import input_agnostic

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 144, 8, dtype=torch.float64, generator=gen) + 5.0  # shared offset
    keys[:, 7] = keys[0, 7]  # position 7: the same key in every image
    score = input_agnostic(keys.sum(0), (keys ** 2).sum((0, 2)), 50)
    assert score[7] == pytest.approx(1.0)
    assert np.median(score) < 0.2  # about 1/50: sample variance vs the layer's
    assert flag(score).tolist() == [7]


def test_agnostic_means_stable_key_of_a_varying_input():
    from vislens.experiments.perception.artifacts import relative

    key = np.array([0.95, 0.95, 0.1])  # stability of the key at three positions
    inp = np.array([0.95, 0.1, 0.1])  # ... and of the LM input there
    score = relative(key, inp)
    # position 0: stable because its input is (a plain background): not agnostic
    assert score[0] == pytest.approx(0.0)
    assert score[1] == pytest.approx(1 - 0.05 / 0.9)  # ignores a varying input
    assert score[2] == pytest.approx(0.0)


def test_tokens_painted_onto_their_pixels_uncovered_pixels_take_the_default():
    boxes = np.array([[0, 0, 4, 4], [4, 0, 8, 4], [0, 0, 8, 8], [2, 2, 3, 3]], float)
    index = M.token_index_map(boxes, (8, 10))
    assert index[0, 0] == 0 and index[0, 5] == 1 and index[6, 6] == 2
    assert index[2, 2] == 3  # the finest box wins where views overlap
    assert (index[:, 8:] == -1).all()  # no box reaches these columns
    painted = M.paint(index, np.array([5, 6, 7, 8]), default=0)
    assert painted[0, 0] == 5 and painted[2, 2] == 8 and (painted[:, 8:] == 0).all()


def test_temp_corr_j_and_f_at_pixels_uses_davis_tolerance():
    assert M.davis_tolerance((480, 854)) == 8  # ceil(0.008 x diagonal)
    a = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    shifted = np.roll(np.roll(a, 2, 0), 2, 1)
    assert M.f_measure(shifted, a, 2) == 1.0  # a square neighbourhood reaches the corner
    assert M.f_measure(shifted, a, 2, disk=True) < 1.0  # DAVIS's disk does not (2.8 px)


def test_sem_seg_chance_levels():
    gt = np.array([0, 0, 0, 1, -1])
    c = M.semseg_chance(gt, ["bg", "a", "b"])
    assert M.semseg_score([c["background"]]) == pytest.approx((3 / 4 + 0) / 2)
    expect = (1 / (3 + 4 / 3 - 1) + (1 / 3) / (1 + 4 / 3 - 1 / 3) + 0) / 3
    assert M.semseg_score([c["random"]]) == pytest.approx(expect)
    told = M.semseg_chance(gt, ["bg", "a", "b"], among=[0, 1])  # the oracle's two classes
    assert set(told["random"]) == {"bg", "a"}


def test_similarity_cosine_or_dot():
    a, b = RNG.normal(size=(5, 8)), RNG.normal(size=(3, 8))
    assert np.allclose(M.similarity(a, b, "dot"), a @ b.T)
    assert np.allclose(M.similarity(a, b), M.cosine(a, b))
    with pytest.raises(ValueError, match="similarity"):
        M.similarity(a, b, "l2")
