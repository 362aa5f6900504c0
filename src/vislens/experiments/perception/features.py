"""One batched pass that returns, per image, the features each perception task compares.

Sources: "keys/L" (post-RoPE, as attention sees them), "keys-pre/L" (after k_proj,
before RoPE: free of position) and "values/L" for every requested LM layer L, with
kv heads flattened; "projector" (the LM input at the image
positions = projector output); "vision" (the vision encoder output the projector read).
Text spans of the prompt get the same LM sources (mean over the span's tokens;
"projector" = their input embeddings); the vision encoder has no text side.

Only image positions and the requested text tokens are captured, and image
features go to a temporary file as each layer produces them (a FeatureStore, in
the dtype the model computed them in, so nothing is rounded): what stays in
memory is one layer's rows of one batch while the forward runs, and afterwards
one source of the images a task compares at once (`ImageFeatures.sources` reads
a source when it is asked for). Memory then grows with (images of one item x
image tokens x one layer), not x every layer: LLaVA-1.5's 32 layers of keys and
values were ~0.6 GB per image in float32, NeXT's ~3 GB. The file lives in the
temporary directory (TMPDIR) and goes when the features do.
A text prefix (placed BEFORE the image in the user turn) and attention knockouts
of flagged image keys are options, for the `prefix` and `artifacts` experiments.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from vislens.interventions import capture, knockout
from vislens.interventions.knockout import LAST
from vislens.interventions.vision import record_projector, vision_rows

SOURCES = ("keys", "values", "projector", "vision")  # the default set
LM_KINDS = {"keys": "keys_post", "keys-pre": "keys_pre", "values": "values"}  # name -> capture
ALL_SOURCES = ("keys", "keys-pre", "values", "projector", "vision")
CAPTURED = {table: kind for kind, table in LM_KINDS.items()}  # capture table -> name
TEXT_TOKENS = ("mean", "last")  # a text span's feature: its tokens' mean, or its last token


class FeatureStore:
    """Image-token features on disk: one (image, source) segment each, read back whole.

    A plain file read with pread, not a memory map: pages of a map that has been read
    count in the process' resident memory until it is unmapped, while file reads land
    in the page cache, which the kernel reclaims. Tensors keep their dtype (bf16 stays
    bf16), so what is read back is bit for bit what was written.
    """

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="vislens-features-")
        self._end = 0
        self._index: dict[tuple[int, str], tuple[int, tuple[int, ...], torch.dtype]] = {}

    def write(self, image: int, name: str, x: torch.Tensor) -> None:
        x = x.detach().to("cpu").contiguous()
        data = memoryview(x.reshape(-1).view(torch.uint8).numpy()) if x.numel() else b""
        done = 0
        while done < len(data):  # pwrite may write less than asked (over 2 GB at once)
            done += os.pwrite(self._file.fileno(), data[done:], self._end + done)
        self._index[(image, name)] = (self._end, tuple(x.shape), x.dtype)
        self._end += len(data)

    def read(self, image: int, name: str) -> torch.Tensor:
        """The stored rows as float32 (what every metric computes in)."""
        offset, shape, dtype = self._index[(image, name)]
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        raw = torch.empty(size, dtype=torch.uint8)
        got = os.preadv(self._file.fileno(), [raw.numpy()], offset) if size else 0
        if got != size:
            raise OSError(f"feature file cut short reading {name} of image {image}")
        return raw.view(dtype).reshape(shape).float()

    @property
    def nbytes(self) -> int:
        return self._end

    def close(self) -> None:
        self._file.close()


class StoredSources(Mapping):
    """One image's sources, each read from its FeatureStore when asked for (not kept)."""

    def __init__(self, store: FeatureStore, image: int, names: Sequence[str]):
        self.store, self.image, self.names = store, image, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.store.read(self.image, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class ImageFeatures:
    """Features of one image's tokens plus where each token sits in the image."""

    sources: Mapping[str, torch.Tensor]  # name -> [n_tokens, dim] float32, cpu
    boxes: np.ndarray  # [n_tokens, 4] x0, y0, x1, y1 original pixels
    rows: np.ndarray  # grid row of each token
    cols: np.ndarray
    tiles: np.ndarray
    token_map: object  # the batch's ImageTokenMap (coverage of masks)
    index: int  # this image's sample index in token_map
    text: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per span: name -> [dim]

    @property
    def n_tokens(self) -> int:
        return len(self.boxes)

    def coverage(self, mask: np.ndarray) -> np.ndarray:
        """Fraction of each token's pixels inside `mask` (token order of `sources`)."""
        return self.token_map.coverage(self.index, mask)[1]

    def token_at(self, points: np.ndarray) -> np.ndarray:
        """Index of the token whose box holds each (x, y) point (nearest centre otherwise)."""
        centres = self.centres()
        pts = np.asarray(points, dtype=float).reshape(-1, 2)
        d = ((pts[:, None, :] - centres[None]) ** 2).sum(-1)
        x, y, box = pts[:, None, 0], pts[:, None, 1], self.boxes[None]
        inside = ((x >= box[..., 0]) & (x < box[..., 2]) & (y >= box[..., 1]) & (y < box[..., 3]))
        d = np.where(inside, -1.0, d)
        return d.argmin(1)

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        w, h = self.token_map.all_image_sizes[self.index][0]
        return int(h), int(w)

    def pixel_index(self, keep: np.ndarray | None = None) -> np.ndarray:
        """[H, W] index of the token (among `keep`, default all) whose box holds each pixel
        of the original image, -1 where none does (metrics.token_index_map)."""
        from vislens.experiments.perception.metrics import token_index_map

        return token_index_map(self.boxes if keep is None else self.boxes[keep],
                               self.image_shape)

    def centres(self) -> np.ndarray:
        return np.stack([(self.boxes[:, 0] + self.boxes[:, 2]) / 2,
                         (self.boxes[:, 1] + self.boxes[:, 3]) / 2], axis=1)


def _keys_wanted(sources) -> bool | str:
    """capture's `keys`: only the kinds of key asked for are gathered (and spilled)."""
    post, pre = "keys" in sources, "keys-pre" in sources
    return (post and pre) or ("post" if post else "pre" if pre else False)


def text_columns(vlm, batch, sample: int, text: str, span: tuple[int, int]) -> np.ndarray:
    """Columns of the tokens of text[span[0]:span[1]], `text` being the end of the prompt.

    The chat text is tokenised without image expansion; tokens after the last image
    placeholder keep their distance to the end of the sequence (left padding), so
    they map to batch columns exactly. Each mapped id is checked.
    """
    full = batch.texts[sample]
    base = full.rfind(text)
    if base < 0:
        raise ValueError(f"prompt {text!r} not found in the rendered chat text")
    start, end = base + span[0], base + span[1]
    enc = vlm.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    picked = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not picked:
        raise ValueError(f"no token covers {full[start:end]!r}")
    seq = batch.input_ids[sample].tolist()
    cols = [len(seq) - (len(ids) - i) for i in picked]
    for c, i in zip(cols, picked, strict=True):
        if c < 0 or seq[c] != ids[i]:
            raise ValueError("could not align prompt tokens with the model's input ids "
                             "(the processor tokenises the text differently)")
    return np.asarray(cols, dtype=np.int64)


def after_image(batch, sample: int) -> np.ndarray:
    """Text columns after the sample's last image token (the queries knockouts block)."""
    tm = batch.token_map
    last = tm.image_end(sample)
    valid = np.flatnonzero(batch.attention_mask[sample].cpu().numpy() > 0)
    return valid[valid > last]


@dataclass
class KeyCells:
    """Image-token cells (tile, row, col) found on one grid, to block on any other.

    Flagged keys are WHERE they are in the image, not their index in one image's
    token order: an anyres image or a Qwen dynamic grid of another size orders
    its tokens differently. On a grid of another shape a cell maps to the cell at
    the same relative place (centre-to-centre) of the same tile.
    """

    tile: np.ndarray
    row: np.ndarray
    col: np.ndarray
    grids: dict[int, tuple[int, int]]  # tile -> (rows, cols) of the grid they were found on

    @classmethod
    def of(cls, features: ImageFeatures, indices) -> KeyCells:
        idx = np.asarray(indices, dtype=np.int64)
        grids = features.token_map.grids[features.index]
        return cls(features.tiles[idx], features.rows[idx], features.cols[idx], dict(grids))

    def __len__(self) -> int:
        return len(self.tile)

    def positions(self, token_map, sample: int) -> np.ndarray:
        """Columns of these cells in `sample` of a batch (every image of a multi-image one)."""
        rows = token_map._rows(sample)
        lookup = {(int(token_map.image[i]), int(token_map.tile[i]), int(token_map.row[i]),
                   int(token_map.col[i])): int(token_map.position[i]) for i in rows}
        target = token_map.grids[sample]
        out = set()
        for image in np.unique(token_map.image[rows]).tolist():
            for t, r, c in zip(self.tile.tolist(), self.row.tolist(), self.col.tolist(),
                               strict=True):
                if t not in target or t not in self.grids:
                    continue
                (r0, c0), (r1, c1) = self.grids[t], target[t]
                rr = min(r1 - 1, int((r + 0.5) * r1 / r0))
                cc = min(c1 - 1, int((c + 0.5) * c1 / c0))
                p = lookup.get((image, t, rr, cc))
                if p is not None:
                    out.add(p)
        return np.asarray(sorted(out), dtype=np.int64)


@contextmanager
def block_keys(vlm, batch, blocked: dict[int, KeyCells] | None):
    """Knock out attention from every text position after the image (and generated
    tokens) to chosen image keys; blocked: layer -> the key cells to block there."""
    with ExitStack() as stack:
        for layer, cells in (blocked or {}).items():
            if len(cells) == 0:
                continue
            edges = []
            for b in range(batch.size):
                k = cells.positions(batch.token_map, b)
                edges.append([(after_image(batch, b), k), (LAST, k)])
            stack.enter_context(knockout(vlm, edges, layers=[int(layer)]))
        yield


@torch.no_grad()
def extract(vlm, images, prompts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]]
            | None = None, layers: Sequence[int] | None = None, sources=SOURCES,
            prefixes: Sequence[str | None] | None = None,
            blocked: dict[int, KeyCells] | None = None, batch_size: int = 8,
            text_token: str = "mean") -> list[ImageFeatures]:
    """Features of each image (one prompt each) for every source, in batches.

    spans: per image, (start, end) character spans of its prompt whose text
    features are wanted (e.g. class names). blocked: layer -> the image key cells
    that text positions may not attend to in that layer. text_token: a span's feature is
    the "mean" of its tokens' or the "last" token's (what attends to the whole span in a
    causal LM). Image features are read
    from disk when a source is asked for (see the module docstring); text features
    (one vector per span and source) stay in memory.
    """
    if text_token not in TEXT_TOKENS:
        raise ValueError(f"text_token {text_token!r}: choose {' or '.join(TEXT_TOKENS)}")
    images, prompts = list(images), list(prompts)
    spans = [list(s) for s in spans] if spans is not None else [[] for _ in images]
    prefixes = list(prefixes) if prefixes is not None else [None] * len(images)
    store = FeatureStore()
    out: list[ImageFeatures] = []
    for i in range(0, len(images), batch_size):
        sl = slice(i, i + batch_size)
        out.extend(_extract_batch(vlm, images[sl], prompts[sl], spans[sl], layers, sources,
                                  prefixes[sl], blocked, store, i, text_token))
    return out


def _extract_batch(vlm, images, prompts, spans, layers, sources, prefixes, blocked,
                   store: FeatureStore, first: int, text_token: str = "mean"):
    batch = vlm.prepare(list(images), list(prompts), prefixes=prefixes)
    tm = batch.token_map
    n = batch.size
    image_pos = [tm.image_positions(b) for b in range(n)]
    text_pos = [[text_columns(vlm, batch, b, prompts[b], s) for s in spans[b]] for b in range(n)]
    positions = [np.concatenate([image_pos[b], *text_pos[b]]) if text_pos[b] else image_pos[b]
                 for b in range(n)]
    want_kv = any(s in sources for s in LM_KINDS)
    lm_layers = list(range(vlm.num_layers)) if layers is None else [int(x) for x in layers]
    texts: list[list[dict[str, torch.Tensor]]] = [[{} for _ in text_pos[b]] for b in range(n)]
    starts = np.cumsum([0] + [len(p) for p in positions])  # capture rows of each sample

    def keep(b: int, name: str, x: torch.Tensor, image: bool = True) -> None:
        """Rows of sample b (its image tokens, then each span's): image rows to the store,
        each span's mean to memory."""
        if image:
            store.write(first + b, name, x[:len(image_pos[b])])
        start = len(image_pos[b])
        for s, cols in enumerate(text_pos[b]):
            rows = x[start:start + len(cols)].float().cpu()
            texts[b][s][name] = rows[-1] if text_token == "last" else rows.mean(0)
            start += len(cols)

    def sink(table: str, layer: int, x: torch.Tensor) -> None:
        kind = CAPTURED[table]
        if kind in sources:
            x = x.reshape(x.shape[0], -1)
            for b in range(n):
                keep(b, f"{kind}/{layer}", x[starts[b]:starts[b + 1]])

    with ExitStack() as stack:
        rec = stack.enter_context(record_projector(vlm)) if "vision" in sources else None
        stack.enter_context(block_keys(vlm, batch, blocked))
        if want_kv:  # keys / values go to `sink` layer by layer, never all kept at once
            stack.enter_context(capture(
                vlm, positions, layers=lm_layers, residual=False,
                keys=_keys_wanted(sources), values="values" in sources,
                sink=sink))
        emb = stack.enter_context(capture(vlm, positions, layers=[0], residual=True))
        vlm.forward(batch, logits_to_keep=1)
    for b in range(n):
        keep(b, "projector", emb.of("residual", 0, b), image="projector" in sources)
    if rec is not None:
        lm_in = [emb.of("residual", 0, b)[:len(image_pos[b])] for b in range(n)]
        vision = torch.split(vision_rows(torch.cat(lm_in), rec), [len(p) for p in image_pos])
        for b in range(n):
            store.write(first + b, "vision", vision[b])
        del rec, vision, lm_in
    del emb
    lm_names = [f"{kind}/{layer}" for layer in lm_layers for kind in LM_KINDS
                if kind in sources] if want_kv else []
    names = lm_names + (["projector"] if "projector" in sources else []) + \
        (["vision"] if "vision" in sources else [])
    feats = []
    for b in range(n):
        # text features in the order of the image sources (projector even when not asked:
        # the text side of the LM input)
        span_feats = [{k: t[k] for k in [*lm_names, "projector"]} for t in texts[b]]
        rows = tm._rows(b)
        feats.append(ImageFeatures(sources=StoredSources(store, first + b, names),
                                   boxes=tm.box[rows], rows=tm.row[rows], cols=tm.col[rows],
                                   tiles=tm.tile[rows], token_map=tm, index=b,
                                   text=span_feats))
    return feats
