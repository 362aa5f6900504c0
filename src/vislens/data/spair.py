"""SPair-71k: PairAnnotation/<split>/*.json pairs over JPEGImages/<category>/<image>.

Each pair JSON gives src_imname / trg_imname, category, src_kps / trg_kps
(matching [x, y] lists, row k <-> row k), src_bndbox / trg_bndbox
([x0, y0, x1, y1]); PCK@0.1 uses the target box, as in the benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vislens.data._io import read_image
from vislens.data.samples import CorrespondencePair, Sample

SPLITS = {"train": "trn", "trn": "trn", "val": "val", "test": "test"}


def load_spair(root: str | Path, split: str = "test", category: str | None = None,
               limit: int | None = None) -> list[CorrespondencePair]:
    """Pairs of `split` (trn / val / test), optionally one category, in file-name order."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"unknown SPair split {split!r}; choose trn, val or test")
    pair_dir = root / "PairAnnotation" / SPLITS[split]
    if not pair_dir.is_dir():
        raise FileNotFoundError(f"{pair_dir} not found; pass the SPair-71k folder")
    files = sorted(pair_dir.glob("*.json"))
    images: dict[tuple[str, str], Sample] = {}
    out: list[CorrespondencePair] = []
    for path in files:
        pair = json.loads(path.read_text())
        cat = pair["category"]
        if category is not None and cat != category:
            continue
        src_kps = _points(pair["src_kps"], path)
        trg_kps = _points(pair["trg_kps"], path)
        if src_kps.shape != trg_kps.shape:
            raise ValueError(f"{path.name}: {len(src_kps)} source but {len(trg_kps)} target "
                             "keypoints")
        src = _image(root, cat, pair["src_imname"], images)
        trg = _image(root, cat, pair["trg_imname"], images)
        out.append(CorrespondencePair(
            id=path.stem, source=src, target=trg, source_points=src_kps, target_points=trg_kps,
            source_box=tuple(float(v) for v in pair["src_bndbox"]),
            target_box=tuple(float(v) for v in pair["trg_bndbox"]),
            category=cat,
            meta={k: pair[k] for k in ("pair_id", "kps_ids", "viewpoint_variation",
                                       "scale_variation", "truncation", "occlusion", "mirror")
                  if k in pair}))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no SPair pairs in {pair_dir}"
                         + (f" for category {category!r}" if category else ""))
    return out


def _points(kps, path: Path) -> np.ndarray:
    pts = np.asarray(kps, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{path.name}: keypoints must be a list of [x, y], got shape {pts.shape}")
    return pts


def _image(root: Path, cat: str, name: str, cache: dict) -> Sample:
    key = (cat, name)
    if key not in cache:
        cache[key] = Sample(id=f"{cat}/{Path(name).stem}",
                            image=read_image(root / "JPEGImages" / cat / name),
                            meta={"source": "spair", "category": cat, "file_name": name})
    return cache[key]
