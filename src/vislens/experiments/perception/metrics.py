"""The six perception scores of Liu et al., at pixel level and at token level.

Features live on image tokens, so every prediction is made per token. It is then
scored two ways:

- PIXEL level (the default, as the benchmarks define their metrics): each token's
  prediction is painted onto the pixels its box covers in the ORIGINAL image
  (`token_index_map` / `paint`; a pixel belongs to the box holding its centre,
  the finest box where views overlap) and mIoU / J&F / PCK are computed at the
  mask's resolution. Pixels no token covers (a center crop's cut, the strip a
  vision tower leaves at a crop's edge, unpadding) take a stated default:
  background (fg-seg, co-seg, ref-seg: not the object; sem-seg: class 0; temp-corr:
  label 0). Ignore pixels of the data set (VOC 255, ImageNet-S 1000) are not scored.
- TOKEN level (a labelled variant): a token's ground truth comes from the fraction
  of its pixels inside a mask (fg when >= 0.5, see `token_labels`), so a source
  with perfect features reaches exactly 1 whatever the patch size.

Features are compared by cosine similarity throughout. Inputs are numpy / torch
arrays, so each rule is tested on hand-built features with known answers.
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


SIMILARITIES = ("cosine", "dot")


def similarity(a, b, kind: str = "cosine") -> np.ndarray:
    """[n, m] similarities of the rows of a and b: cosine, or the plain dot product."""
    if kind == "cosine":
        return cosine(a, b)
    if kind == "dot":
        return _np(a).astype(np.float64) @ _np(b).astype(np.float64).T
    raise ValueError(f"similarity {kind!r}: choose {' or '.join(SIMILARITIES)}")


def token_labels(coverage: np.ndarray, threshold: float = COVERAGE) -> np.ndarray:
    return np.asarray(coverage) >= threshold


def inter_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    return int((pred & gt).sum()), int((pred | gt).sum())


# ---- tokens -> pixels ----------------------------------------------------------------------------
def token_index_map(boxes, shape: tuple[int, int]) -> np.ndarray:
    """[H, W] index of the token whose box holds each pixel's centre; -1 where none does.

    Boxes are (x0, y0, x1, y1) in original pixels, x1 / y1 exclusive (the token map's
    boxes); a pixel belongs to a box when its centre does, the rule of
    ImageTokenMap.coverage. Where boxes of several views overlap (a base view under
    high-resolution tiles) the smallest box wins: the finest view of that pixel.
    """
    h, w = int(shape[0]), int(shape[1])
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0 = np.clip(np.ceil(b[:, 0] - 0.5), 0, w).astype(int)
    x1 = np.clip(np.ceil(b[:, 2] - 0.5), 0, w).astype(int)
    y0 = np.clip(np.ceil(b[:, 1] - 0.5), 0, h).astype(int)
    y1 = np.clip(np.ceil(b[:, 3] - 0.5), 0, h).astype(int)
    area = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    out = np.full((h, w), -1, dtype=np.int64)
    for t in np.argsort(-area, kind="stable"):  # largest first: smaller boxes paint over
        out[y0[t]:y1[t], x0[t]:x1[t]] = t
    return out


def paint(index_map: np.ndarray, values, default=0) -> np.ndarray:
    """Per-token values painted onto pixels (`token_index_map`); uncovered pixels = default."""
    values = np.asarray(values)
    if values.size == 0:
        return np.full(index_map.shape, default, dtype=values.dtype)
    picked = values[np.maximum(index_map, 0)]
    return np.where(index_map >= 0, picked, np.asarray(default, dtype=values.dtype))


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


def fg_seg_predict(support_x, support_y, query_x) -> list[np.ndarray]:
    """The probe's fg / bg per token of each query image (one array per query)."""
    pred = linear_probe(np.concatenate([_np(s) for s in support_x]),
                        np.concatenate([np.asarray(s, bool) for s in support_y]),
                        np.concatenate([_np(q) for q in query_x]))
    return np.split(pred, np.cumsum([len(q) for q in query_x])[:-1])


def fg_counts(pred, gt, valid=None) -> dict:
    """fg and bg intersection / union of flat (or same-shape) predictions; `valid` = which
    elements are scored (None: all)."""
    pred, gt = np.asarray(pred, bool).ravel(), np.asarray(gt, bool).ravel()
    if valid is not None:
        keep = np.asarray(valid, bool).ravel()
        pred, gt = pred[keep], gt[keep]
    fi, fu = inter_union(pred, gt)
    bi, bu = inter_union(~pred, ~gt)
    return {"fg_i": fi, "fg_u": fu, "bg_i": bi, "bg_u": bu}


def fg_seg_stats(support_x, support_y, query_x, query_y) -> dict:
    """Intersection / union of fg and bg for the queries of one episode (token level)."""
    pred = fg_seg_predict(support_x, support_y, query_x)
    return fg_counts(np.concatenate(pred), np.concatenate([np.asarray(q, bool)
                                                           for q in query_y]))


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
    per_image, k = coseg_assign(features, k=k, seed=seed)
    free = coseg_free(per_image, k, borders)
    gt = np.concatenate([np.asarray(g, bool) for g in labels])
    assign = np.concatenate(per_image)
    ious = []
    for c in range(k):
        i, u = inter_union(assign == c, gt)
        ious.append(i / u if u else 0.0)
    return {"free": ious[free], "oracle": max(ious)}


def coseg_assign(features: list, k: int = 3, seed: int = 0) -> tuple[list[np.ndarray], int]:
    """k-means on the unit vectors of all tokens of a set: (cluster per token, per image; k)."""
    x = normalise(np.concatenate([_np(f) for f in features]))
    k = max(1, min(k, len(np.unique(x, axis=0))))
    _, assign = kmeans2(x, k, minit="++", seed=seed, iter=20)
    return np.split(assign, np.cumsum([len(f) for f in features])[:-1]), k


def coseg_free(per_image: list[np.ndarray], k: int, borders: list | None = None) -> int:
    """The object cluster chosen without ground truth: present in the most images, then
    least on the images' borders (see coseg_iou)."""
    assign = np.concatenate(per_image)
    presence = np.array([np.mean([(im == c).any() for im in per_image]) for c in range(k)])
    if borders is not None:
        edge = np.concatenate([np.asarray(b, bool) for b in borders])
        on_border = np.array([(assign[edge] == c).mean() if edge.any() else 0.0
                              for c in range(k)])
    else:
        on_border = np.zeros(k)
    return int(np.lexsort((on_border, -presence))[0])  # most present, then least on borders


def pooled_iou(preds: list, gts: list, valid: list | None = None) -> float:
    """IoU with intersections and unions summed over several images (nan: empty union)."""
    i = u = 0
    for n, (p, g) in enumerate(zip(preds, gts, strict=True)):
        p, g = np.asarray(p, bool), np.asarray(g, bool)
        if valid is not None and valid[n] is not None:
            p, g = p[np.asarray(valid[n], bool)], g[np.asarray(valid[n], bool)]
        a, b = inter_union(p, g)
        i, u = i + a, u + b
    return i / u if u else float("nan")


# ---- sem-seg and ref-seg: text vs image ------------------------------------------------------
def semseg_predict(image_x, text_x) -> np.ndarray:
    """Each token's class: the text feature (class name) it is most similar to."""
    return cosine(image_x, text_x).argmax(1)


def semseg_stats(pred: np.ndarray, gt: np.ndarray, names: list[str]) -> dict:
    """Per-class intersection / union; gt < 0 = ignored token / pixel. names[i] = class of id
    i. Only classes in the truth or the prediction are listed (the others are 0 / 0)."""
    keep = np.asarray(gt).ravel() >= 0
    pred, gt = np.asarray(pred).ravel()[keep], np.asarray(gt).ravel()[keep]
    out = {}
    for c in np.union1d(np.unique(pred), np.unique(gt)).tolist():
        p, g = pred == c, gt == c
        out[names[int(c)]] = [int((p & g).sum()), int((p | g).sum())]
    return {name: out[name] for name in names if name in out}  # in class-id order


def semseg_chance(gt: np.ndarray, names: list[str], among: list[int] | None = None
                  ) -> dict[str, dict]:
    """Per-class stats of two trivial predictors of the same truth (gt < 0 ignored):
    "background" (every element class 0) and "random" (each element a class drawn
    uniformly from `among`, default all len(names) classes; in expectation, per drawn
    class: intersection g/K, union g + N/K - g/K)."""
    g = np.asarray(gt).ravel()
    g = g[g >= 0]
    ids = list(range(len(names))) if among is None else [int(i) for i in among]
    k, n = len(ids), len(g)
    counts = np.bincount(g, minlength=len(names))
    random = {names[i]: [float(counts[i]) / k, float(counts[i]) + n / k - float(counts[i]) / k]
              for i in ids}
    for i in np.flatnonzero(counts).tolist():  # truth of a class never drawn: missed whole
        random.setdefault(names[i], [0.0, float(counts[i])])
    random = {name: random[name] for name in names if name in random}
    return {"background": semseg_stats(np.zeros_like(g), g, names), "random": random}


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
    free, top = refseg_select(image_x, text_x, k)
    return {"free": _iou(free, gt), "oracle": _iou(top, gt)}


def refseg_select(image_x, text_x, k: int, kind: str = "cosine"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens picked for an expression: (above Otsu's threshold, the top k) per token, by
    `kind` of similarity (cosine or dot)."""
    sim = similarity(image_x, _np(text_x).reshape(1, -1), kind)[:, 0]
    top = np.zeros(len(sim), dtype=bool)
    top[np.argsort(-sim, kind="stable")[:k]] = True
    return sim > otsu_threshold(sim), top


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two boolean arrays (nan when both are empty)."""
    i, u = inter_union(pred, gt)
    return i / u if u else float("nan")


_iou = iou


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


def davis_tolerance(shape: tuple[int, int], fraction: float = 0.008) -> int:
    """DAVIS's boundary tolerance in pixels: ceil(0.008 x the image diagonal)."""
    return int(np.ceil(fraction * np.hypot(*shape)))


def f_measure(pred: np.ndarray, gt: np.ndarray, tolerance: int = 1, disk: bool = False
              ) -> float:
    """DAVIS boundary F: boundaries match within `tolerance` cells (token grid: a square
    neighbourhood) or pixels (`disk`: a disk of that radius, as DAVIS dilates)."""
    bp, bg = boundary(pred), boundary(gt)
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    st = np.ones((2 * tolerance + 1, 2 * tolerance + 1), bool)
    if disk:
        yy, xx = np.mgrid[-tolerance:tolerance + 1, -tolerance:tolerance + 1]
        st = xx ** 2 + yy ** 2 <= tolerance ** 2
    precision = (bp & ndimage.binary_dilation(bg, st)).sum() / bp.sum()
    recall = (bg & ndimage.binary_dilation(bp, st)).sum() / bg.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def j_and_f(preds: list[np.ndarray], gts: list[np.ndarray], tolerance: int = 1,
            disk: bool = False) -> dict:
    """Mean region J (IoU) and boundary F over objects and frames 1.. (label maps [H, W]:
    token grids with a 1-cell tolerance, or pixels with `davis_tolerance` and `disk`)."""
    js, fs = [], []
    objects = sorted({int(v) for g in gts for v in np.unique(g) if v > 0})
    for p, g in zip(preds[1:], gts[1:], strict=True):
        for o in objects:
            pm, gm = p == o, g == o
            i, u = inter_union(pm, gm)
            js.append(1.0 if u == 0 else i / u)
            fs.append(f_measure(pm, gm, tolerance, disk))
    j = float(np.mean(js)) if js else float("nan")
    f = float(np.mean(fs)) if fs else float("nan")
    return {"j": j, "f": f, "jf": (j + f) / 2}
