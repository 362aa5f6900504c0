"""The six perception scores of Liu et al., on token-level features and labels.

Everything is scored at IMAGE-TOKEN level: a token's ground truth comes from the
fraction of its pixels inside a mask (fg when >= 0.5, see `token_labels`), so a
source with perfect features reaches exactly 1 whatever the patch size. Features
are compared by cosine similarity throughout. Inputs are numpy / torch arrays, so
each rule is tested on hand-built features with known answers.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.cluster.vq import kmeans2

COVERAGE = 0.5  # a token is foreground when at least this fraction of its pixels is


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def normalise(x) -> np.ndarray:
    x = _np(x).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine(a, b) -> np.ndarray:
    """[n, m] cosine similarities of the rows of a and b."""
    return normalise(a) @ normalise(b).T


def token_labels(coverage: np.ndarray, threshold: float = COVERAGE) -> np.ndarray:
    return np.asarray(coverage) >= threshold


def inter_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    return int((pred & gt).sum()), int((pred | gt).sum())


# ---- fg-seg: few-shot linear probe ------------------------------------------------------------
def linear_probe(train_x, train_y, test_x, ridge: float = 1e-2) -> np.ndarray:
    """Class-balanced ridge-regression probe (closed form, standardised features).

    A least-squares probe needs no optimiser settings, so the score depends on the
    features only. Targets are +1 (fg) / -1 (bg), each class weighted to half the
    total (objects are a few % of the tokens; unweighted, "all background" wins);
    fg when the output > 0.
    """
    x, t = _np(train_x), _np(test_x)
    fg = np.asarray(train_y, bool)
    y = np.where(fg, 1.0, -1.0)
    n_fg = max(int(fg.sum()), 1)
    n_bg = max(int((~fg).sum()), 1)
    sw = np.sqrt(np.where(fg, 0.5 / n_fg, 0.5 / n_bg) * len(y))
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, t = (x - mu) / sd, (t - mu) / sd
    x1 = np.concatenate([x, np.ones((len(x), 1))], 1) * sw[:, None]
    t1 = np.concatenate([t, np.ones((len(t), 1))], 1)
    y = y * sw
    n, d = x1.shape
    if d > n:  # dual form: cheaper and identical when dims exceed samples
        w = x1.T @ np.linalg.solve(x1 @ x1.T + ridge * n * np.eye(n), y)
    else:
        w = np.linalg.solve(x1.T @ x1 + ridge * n * np.eye(d), x1.T @ y)
    return t1 @ w > 0


def fg_seg_stats(support_x, support_y, query_x, query_y) -> dict:
    """Intersection / union of fg and bg for the queries of one episode."""
    pred = linear_probe(np.concatenate([_np(s) for s in support_x]),
                        np.concatenate([np.asarray(s, bool) for s in support_y]),
                        np.concatenate([_np(q) for q in query_x]))
    gt = np.concatenate([np.asarray(q, bool) for q in query_y])
    fi, fu = inter_union(pred, gt)
    bi, bu = inter_union(~pred, ~gt)
    return {"fg_i": fi, "fg_u": fu, "bg_i": bi, "bg_u": bu}


def fg_seg_score(stats: list[dict], classes: list[str]) -> float:
    """Pascal-5i mIoU: fg IoU per class over all its episodes, averaged over classes."""
    per: dict[str, list[int]] = {}
    for s, c in zip(stats, classes, strict=True):
        acc = per.setdefault(c, [0, 0])
        acc[0] += s["fg_i"]
        acc[1] += s["fg_u"]
    ious = [i / u for i, u in per.values() if u > 0]
    return float(np.mean(ious)) if ious else float("nan")


# ---- co-seg: clustering -----------------------------------------------------------------------
def coseg_iou(features: list, labels: list, k: int = 3, seed: int = 0,
              borders: list | None = None) -> dict[str, float]:
    """Cluster all tokens of a set (k-means on unit vectors); IoU of the object cluster.

    The clustering sees all images of the set at once (that is what makes it
    CO-segmentation). "free" picks the object cluster without ground truth: the
    cluster present in the most images of the set and least on the image borders
    (the background fills the borders; the common object recurs in every image).
    "oracle" is the best-IoU cluster, the usual but optimistic matching, reported
    beside it. IoU is pooled over the set's tokens. borders: per image, which
    tokens lie on the grid's outer ring (None: the free choice uses presence only).
    """
    x = normalise(np.concatenate([_np(f) for f in features]))
    gt = np.concatenate([np.asarray(g, bool) for g in labels])
    k = max(1, min(k, len(np.unique(x, axis=0))))
    _, assign = kmeans2(x, k, minit="++", seed=seed, iter=20)
    ious = []
    for c in range(k):
        i, u = inter_union(assign == c, gt)
        ious.append(i / u if u else 0.0)
    sizes = np.cumsum([0] + [len(g) for g in labels])
    per_image = [assign[a:b] for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    presence = np.array([np.mean([(im == c).any() for im in per_image]) for c in range(k)])
    if borders is not None:
        edge = np.concatenate([np.asarray(b, bool) for b in borders])
        on_border = np.array([(assign[edge] == c).mean() if edge.any() else 0.0
                              for c in range(k)])
    else:
        on_border = np.zeros(k)
    free = int(np.lexsort((on_border, -presence))[0])  # most present, then least on borders
    return {"free": ious[free], "oracle": max(ious)}


# ---- sem-seg and ref-seg: text vs image ------------------------------------------------------
def semseg_predict(image_x, text_x) -> np.ndarray:
    """Each token's class: the text feature (class name) it is most similar to."""
    return cosine(image_x, text_x).argmax(1)


def semseg_stats(pred: np.ndarray, gt: np.ndarray, names: list[str]) -> dict:
    """Per-class intersection / union; gt < 0 = ignored token. names[i] = class of id i."""
    keep = np.asarray(gt) >= 0
    pred, gt = np.asarray(pred)[keep], np.asarray(gt)[keep]
    return {name: list(inter_union(pred == c, gt == c)) for c, name in enumerate(names)
            if (gt == c).any() or (pred == c).any()}


def semseg_score(stats: list[dict]) -> float:
    """mIoU over classes, intersections and unions summed over the data set."""
    acc: dict[str, list[int]] = {}
    for s in stats:
        for name, (i, u) in s.items():
            a = acc.setdefault(name, [0, 0])
            a[0] += i
            a[1] += u
    ious = [i / u for i, u in acc.values() if u > 0]
    return float(np.mean(ious)) if ious else float("nan")


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """The cut that best splits `values` into two groups (max between-class variance)."""
    v = np.asarray(values, dtype=np.float64)
    if v.max() - v.min() < 1e-12:
        return float(v.max())
    hist, edges = np.histogram(v, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = (w0 * w1 * (m0 - m1) ** 2)[:-1]
    best = np.flatnonzero(np.isclose(between, between.max()))  # empty bins tie: take the middle
    return float(edges[1:][best].mean())


def refseg_iou(image_x, text_x, gt: np.ndarray) -> dict[str, float]:
    """IoU of the tokens most similar to the expression.

    "free": tokens above Otsu's threshold of the image's similarities (no ground
    truth, no tuning); "oracle": the top k, k = the target's token count taken
    from the ground truth (scale-free but optimistic), reported beside it.
    """
    gt = np.asarray(gt, bool)
    k = int(gt.sum())
    if k == 0:
        return {"free": float("nan"), "oracle": float("nan")}
    sim = cosine(image_x, _np(text_x).reshape(1, -1))[:, 0]
    top = np.zeros_like(gt)
    top[np.argsort(-sim, kind="stable")[:k]] = True
    free = sim > otsu_threshold(sim)
    return {"free": _iou(free, gt), "oracle": _iou(top, gt)}


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    i, u = inter_union(pred, gt)
    return i / u if u else float("nan")


# ---- sem-corr: nearest neighbours --------------------------------------------------------------
def nearest_tokens(source_x, target_x, source_tokens: np.ndarray) -> np.ndarray:
    """For each chosen source token, the target token with the most similar feature."""
    sim = cosine(_np(source_x)[np.asarray(source_tokens, dtype=np.int64)], target_x)
    return sim.argmax(1)


# ---- temp-corr: label propagation ---------------------------------------------------------------
def propagate(frames_x: list, first: np.ndarray, top_k: int = 5, temperature: float = 0.1
              ) -> list[np.ndarray]:
    """Labels of every frame from frame 0's labels, DINO-style label propagation.

    Each token of frame t takes the softmax(sim / temperature)-weighted vote of its
    top_k most similar tokens among frame 0 (ground truth) and frame t-1 (its own
    prediction). Returns integer labels per frame (frame 0 = the given labels).
    """
    first = np.asarray(first, dtype=np.int64)
    n_labels = int(first.max()) + 1
    preds = [first]
    for t in range(1, len(frames_x)):
        ctx_x = np.concatenate([_np(frames_x[0]), _np(frames_x[t - 1])])
        ctx_y = np.concatenate([first, preds[-1]])
        sim = cosine(frames_x[t], ctx_x)
        k = min(top_k, sim.shape[1])
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(sim, idx, 1) / temperature
        w = np.exp(s - s.max(1, keepdims=True))
        votes = np.zeros((len(sim), n_labels))
        np.add.at(votes, (np.repeat(np.arange(len(sim)), k), ctx_y[idx].ravel()), w.ravel())
        preds.append(votes.argmax(1))
    return preds


def boundary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def f_measure(pred: np.ndarray, gt: np.ndarray, tolerance: int = 1) -> float:
    """DAVIS boundary F on the token grid: boundaries match within `tolerance` cells."""
    bp, bg = boundary(pred), boundary(gt)
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    st = np.ones((2 * tolerance + 1, 2 * tolerance + 1), bool)
    precision = (bp & ndimage.binary_dilation(bg, st)).sum() / bp.sum()
    recall = (bg & ndimage.binary_dilation(bp, st)).sum() / bg.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def j_and_f(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict:
    """Mean region J (IoU) and boundary F over objects and frames 1.. (grids [H, W])."""
    js, fs = [], []
    objects = sorted({int(v) for g in gts for v in np.unique(g) if v > 0})
    for p, g in zip(preds[1:], gts[1:], strict=True):
        for o in objects:
            pm, gm = p == o, g == o
            i, u = inter_union(pm, gm)
            js.append(1.0 if u == 0 else i / u)
            fs.append(f_measure(pm, gm))
    j = float(np.mean(js)) if js else float("nan")
    f = float(np.mean(fs)) if fs else float("nan")
    return {"j": j, "f": f, "jf": (j + f) / 2}
