"""ImageTokenMap: every image token of a batch, tied to its pixels.

This is what turns an instance mask into token positions, grows an object's
token set by a buffer, and tells the viewer which patch to highlight.
Positions are always COLUMNS of the prepared (left-padded) batch, so they can
be used directly to index `input_ids`, hidden states, keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vislens.models.geometry import Layout


def no_layout(family: str, what: str):
    """The error of a family without a layout meeting an experiment that needs pixels."""
    from vislens.errors import VislensError

    return VislensError(f"this experiment {what}, which needs an image-token layout; vislens "
                        f"has none for {family or 'this model'!r} (add one in "
                        "vislens/models/families/); without it vislens.interventions (capture, "
                        "knockout and ablation of token positions) and `vislens surface` work")


def options_need_layout(family: str, options: str, instead: str):
    """The error of experiment options that map the object's mask to image tokens (e.g.
    "knockout conditions object->last") on a family without a layout, saying what runs
    there instead."""
    from vislens.errors import VislensError

    return VislensError(f"{options} map the object's mask to image tokens, which needs a "
                        f"token layout; vislens has none for {family!r}: {instead} or add a "
                        "family module")


@dataclass
class ImageTokenMap:
    """One row per image patch token; newline tokens are kept apart (`newline_*`)."""

    batch: np.ndarray
    position: np.ndarray
    image: np.ndarray
    tile: np.ndarray  # 0 = base view; 1 = stitched high-res view (NeXT / OneVision)
    row: np.ndarray
    col: np.ndarray
    box: np.ndarray  # [N, 4] x0, y0, x1, y1 in original pixels (x1, y1 exclusive): what the
    #                  token's patch sees (geometry.py), so boxes may leave gaps between them
    crop: np.ndarray  # processor crop the token was read from (0 = base / whole image)
    newline_batch: np.ndarray
    newline_position: np.ndarray
    newline_tile: np.ndarray
    newline_row: np.ndarray
    grids: list[dict[int, tuple[int, int]]]  # per sample (its first image): tile -> (rows, cols)
    image_sizes: list[tuple[int, int]]  # per sample (its first image): (width, height)
    image_grids: list[list[dict[int, tuple[int, int]]]]  # per sample, per image
    all_image_sizes: list[list[tuple[int, int]]]  # per sample, per image
    geometric: bool = True  # False: the family has no layout (positions only, no boxes)
    family: str = ""
    # text tokens inside an image's block (row / column markers, break and end tokens,
    # crop-row newlines): neither patches nor prompt
    marker_batch: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    marker_position: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    marker_image: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def build(cls, layouts: list[Layout] | list[list[Layout]], positions: list[np.ndarray],
              family: str = "", markers: list[list[np.ndarray]] | None = None) -> ImageTokenMap:
        """Tie each sample's layouts (one per image, sequence order) to the columns of its
        image tokens; `markers`: per sample, per image, the columns of its marker tokens."""
        per_sample = [lay if isinstance(lay, list | tuple) else [lay] for lay in layouts]
        cols: dict[str, list] = {k: [] for k in (
            "batch", "position", "image", "tile", "row", "col", "box", "crop",
            "nl_batch", "nl_position", "nl_tile", "nl_row")}
        for b, (lays, pos) in enumerate(zip(per_sample, positions, strict=True)):
            n_slots = sum(len(lay) for lay in lays)
            if n_slots != len(pos):
                raise ValueError(
                    f"sample {b}: the processor put {len(pos)} image tokens in the sequence but "
                    f"the geometry replay gives {n_slots}; unsupported image processor setting")
            image = np.repeat(np.arange(len(lays)), [len(lay) for lay in lays])
            slots = [(lay, k) for lay in lays for k in range(len(lay))]
            for (lay, k), p, i in zip(slots, pos, image, strict=True):
                if lay.newline[k]:
                    cols["nl_batch"].append(b)
                    cols["nl_position"].append(p)
                    cols["nl_tile"].append(lay.tile[k])
                    cols["nl_row"].append(lay.row[k])
                    continue
                cols["batch"].append(b)
                cols["position"].append(p)
                cols["image"].append(int(i))
                cols["tile"].append(lay.tile[k])
                cols["row"].append(lay.row[k])
                cols["col"].append(lay.col[k])
                cols["box"].append(lay.boxes[k])
                cols["crop"].append(lay.crop[k])

        def arr(key):
            return np.asarray(cols[key], dtype=np.int64)

        marks = [(b, i, int(c)) for b, per in enumerate(markers or [])
                 for i, found in enumerate(per) for c in found]
        marks = np.asarray(marks, dtype=np.int64).reshape(-1, 3)

        return cls(
            batch=arr("batch"), position=arr("position"), image=arr("image"), tile=arr("tile"),
            row=arr("row"), col=arr("col"),
            box=np.asarray(cols["box"], dtype=np.float64).reshape(-1, 4), crop=arr("crop"),
            newline_batch=arr("nl_batch"), newline_position=arr("nl_position"),
            newline_tile=arr("nl_tile"), newline_row=arr("nl_row"),
            grids=[dict(lays[0].grids) for lays in per_sample],
            image_sizes=[lays[0].image_size for lays in per_sample],
            image_grids=[[dict(lay.grids) for lay in lays] for lays in per_sample],
            all_image_sizes=[[lay.image_size for lay in lays] for lays in per_sample],
            geometric=all(lay.geometric for lays in per_sample for lay in lays),
            family=family,
            marker_batch=marks[:, 0], marker_image=marks[:, 1], marker_position=marks[:, 2],
        )

    def __len__(self) -> int:
        return len(self.position)

    # ---- lookups -------------------------------------------------------------------------
    def _rows(self, sample: int) -> np.ndarray:
        if not 0 <= sample < len(self.grids):
            raise ValueError(f"sample {sample} is out of range (batch of {len(self.grids)})")
        return np.flatnonzero(self.batch == sample)

    def _rows_of(self, sample: int, positions) -> np.ndarray:
        rows = self._rows(sample)
        lookup = dict(zip(self.position[rows].tolist(), rows.tolist(), strict=True))
        try:
            return np.asarray([lookup[int(p)] for p in np.asarray(positions).ravel()],
                              dtype=np.int64)
        except KeyError as err:
            raise ValueError(f"position {err.args[0]} is not an image patch token of sample "
                             f"{sample}") from None

    def image_positions(self, sample: int, tile: int | None = None) -> np.ndarray:
        """Columns of the sample's image patch tokens (newlines excluded), sequence order."""
        rows = self._rows(sample)
        if tile is not None:
            rows = rows[self.tile[rows] == tile]
        return self.position[rows]

    def newline_positions(self, sample: int) -> np.ndarray:
        return self.newline_position[self.newline_batch == sample]

    def marker_positions(self, sample: int) -> np.ndarray:
        """Columns of the text tokens that frame the sample's image tokens (sequence order)."""
        return self.marker_position[self.marker_batch == sample]

    def image_end(self, sample: int) -> int:
        """The last column of the sample's image blocks (patches, newlines and markers)."""
        return int(max(self.image_positions(sample).max(initial=-1),
                       self.newline_positions(sample).max(initial=-1),
                       self.marker_positions(sample).max(initial=-1)))

    def last_row(self, sample: int) -> np.ndarray:
        """Patch tokens of the last image row the LM reads (bottom row of the tile it reads
        last: the high-res view of NeXT / OneVision, the global view of tiling families)."""
        rows = self._rows(sample)
        last_tile = self.tile[rows[np.argmax(self.position[rows])]]
        rows = rows[self.tile[rows] == last_tile]
        return self.position[rows[self.row[rows] == self.row[rows].max()]]

    def boxes(self, positions, sample: int = 0) -> np.ndarray:
        """[n, 4] pixel boxes (x0, y0, x1, y1) in the original image, for drawing."""
        return self.box[self._rows_of(sample, positions)]

    def cells(self, positions, sample: int = 0) -> np.ndarray:
        """[n, 3] (tile, row, col) of each position."""
        rows = self._rows_of(sample, positions)
        return np.stack([self.tile[rows], self.row[rows], self.col[rows]], axis=1)

    # ---- masks -> tokens -------------------------------------------------------------------
    def coverage(self, sample: int, mask: np.ndarray, image: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(positions, fraction of each token's pixels inside `mask`), all patch tokens of
        image `image` of the sample (the only one unless the sample holds several).

        A token's pixels are those of its box: the pixels its patch really
        sees. Boxes do not tile the image: no token sees the strip a vision
        tower leaves at each crop's far edge (OneVision: 6 px of every 384),
        nor what a center crop or `unpad_image` cuts away. Mask pixels there
        count for no token, so a mask lying wholly in such a gap covers nothing.
        """
        self.require_geometry("maps object masks to image tokens")
        mask = np.asarray(mask, dtype=bool)
        rows = self._rows(sample)
        rows = rows[self.image[rows] == image]
        w, h = self.all_image_sizes[sample][image]
        if mask.shape != (h, w):
            raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but sample {sample}'s "
                             f"image is {w}x{h}; give the mask in ORIGINAL image pixels")
        box = self.box[rows]
        # a pixel belongs to a box when its centre does: abutting boxes of one grid share it
        # out (never counted twice), and a pixel in a gap between boxes is nobody's
        x0 = np.clip(np.ceil(box[:, 0] - 0.5), 0, w).astype(int)
        x1 = np.clip(np.ceil(box[:, 2] - 0.5), 0, w).astype(int)
        y0 = np.clip(np.ceil(box[:, 1] - 0.5), 0, h).astype(int)
        y1 = np.clip(np.ceil(box[:, 3] - 0.5), 0, h).astype(int)
        integral = np.zeros((h + 1, w + 1), dtype=np.int64)
        integral[1:, 1:] = mask.cumsum(0).cumsum(1)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        area = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
        frac = np.where(area > 0, inside / np.maximum(area, 1), 0.0)
        return self.position[rows], frac

    def require_geometry(self, what: str) -> None:
        """One clear line where an experiment needs pixels and the family has none."""
        if not self.geometric:
            raise no_layout(self.family, what)

    def positions(self, sample: int, mask: np.ndarray, min_coverage: float = 0.0) -> np.ndarray:
        """Patch tokens covering `mask`: any overlap when min_coverage is 0, else that fraction."""
        if not 0.0 <= min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be in [0, 1], got {min_coverage}")
        pos, frac = self.coverage(sample, mask)
        keep = frac > 0 if min_coverage == 0 else frac >= min_coverage
        return pos[keep]

    def dilate(self, positions, k: int, sample: int = 0) -> np.ndarray:
        """Grow a token set by k cells (8-neighbour, Chebyshev), staying inside each tile."""
        self.require_geometry("grows token sets by neighbouring cells")
        if k < 0:
            raise ValueError(f"dilation k must be >= 0, got {k}")
        rows = self._rows(sample)
        cells = zip(self.image[rows], self.tile[rows], self.row[rows], self.col[rows],
                    self.position[rows], strict=True)
        grid = {(int(i), int(t), int(r), int(c)): int(p) for i, t, r, c, p in cells}
        out = set()
        picked = self._rows_of(sample, positions)
        for i, t, r, c in zip(self.image[picked], self.tile[picked], self.row[picked],
                              self.col[picked], strict=True):
            for dr in range(-k, k + 1):
                for dc in range(-k, k + 1):
                    p = grid.get((int(i), int(t), int(r) + dr, int(c) + dc))
                    if p is not None:
                        out.add(p)
        return np.asarray(sorted(out), dtype=np.int64)
