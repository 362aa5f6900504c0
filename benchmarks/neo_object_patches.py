"""Neo et al.'s released object-patch code against vislens' token map (docs/PROTOCOL.md,
A1 selection, rows "target outside the model's view" and "object-patch grid").

    python benchmarks/neo_object_patches.py /path/to/llava-interp

A COCO-format fixture: 240 random star-shaped polygons of 1000-2000 px^2 at uniform
positions in 8 COCO image sizes. For each, the object patches of the released code
(src/utils.py correct_annotations_for_crop + find_overlapping_patches, imported from the
checkout given, never copied) and of vislens (the LLaVA-1.5 look-alike's real processor
and token map, tests/lookalikes/) as 24x24 indices.
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mu

sys.path.insert(0, str(Path(sys.argv[1]) / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import utils as neo  # noqa: E402  (clemneo/llava-interp src/utils.py)
from lookalikes import LLAVA15, checkpoint_dir  # noqa: E402

from vislens.models import load  # noqa: E402

rng = np.random.default_rng(0)
SIZES = [(640, 427), (640, 480), (500, 375), (480, 640), (640, 426), (427, 640), (612, 612),
         (640, 360)]
vlm = load(str(checkpoint_dir(LLAVA15)))
rows = []
for k in range(240):
    w, h = SIZES[k % len(SIZES)]
    # a random star-convex polygon of 8-16 vertices scaled to an area in (1000, 2000)
    n = int(rng.integers(8, 17))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.6, 1.0, n)
    px, py = np.cos(ang) * rad, np.sin(ang) * rad
    a0 = 0.5 * abs(np.dot(px, np.roll(py, 1)) - np.dot(py, np.roll(px, 1)))
    s = np.sqrt(rng.uniform(1050, 1950) / a0)
    cx, cy = rng.uniform(20, w - 20), rng.uniform(20, h - 20)
    poly = np.stack([cx + px * s, cy + py * s], 1).clip(0, [w - 1, h - 1])
    seg = [poly.reshape(-1).round(2).tolist()]
    rle = mu.frPyObjects(seg, h, w)
    area = float(mu.area(mu.merge(rle)))
    x0, y0 = poly.min(0)
    x1, y1 = poly.max(0)
    ann = {"segmentation": seg, "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
           "area": area, "category_id": 1, "id": k}
    img = Image.new("RGB", (w, h))
    cimg, canns = neo.correct_annotations_for_crop(img, ann)
    neo_set = None
    if canns:
        _, idx = neo.find_overlapping_patches(cimg, canns[0])
        neo_set = set(idx)
    mask = mu.decode(mu.merge(rle)).astype(bool)
    tm = vlm.prepare([img], ["x"]).token_map
    pos = tm.positions(0, mask)
    cells = tm.cells(pos, 0)
    ours = {int(r) * 24 + int(c) for _, r, c in cells}
    rows.append({"size": (w, h), "neo": neo_set, "ours": ours, "crop_edge": bool(min(w, h) % 24)})
skipped_neo = sum(r["neo"] is None for r in rows)
none_ours = sum(len(r["ours"]) == 0 for r in rows)
both = [r for r in rows if r["neo"] is not None]
diff = [r for r in both if r["neo"] != r["ours"]]
sym = [len(r["neo"] ^ r["ours"]) for r in both]
by = {}
for r in both:
    key = min(r["size"])
    d = by.setdefault(key, [0, 0, []])
    d[0] += 1
    d[1] += r["neo"] != r["ours"]
    d[2].append(len(r["neo"] ^ r["ours"]))
print(json.dumps({"images": len(rows), "neo_skipped_no_valid_polygon": skipped_neo,
                  "vislens_no_object_token": none_ours,
                  "object_sets_differ": len(diff), "of": len(both),
                  "mean_sym_diff_tokens": float(np.mean(sym)),
                  "mean_object_tokens_vislens": float(np.mean([len(r["ours"]) for r in both])),
                  "by_short_side": {k: {"n": v[0], "differ": v[1],
                                        "mean_sym_diff": float(np.mean(v[2]))}
                                    for k, v in sorted(by.items())}}, indent=1))
