"""How far each image token's box centre is from the centre of the pixels its patch saw.

Not a test: it prints, per family, image size and view (base / high-res), the
max and mean distance |box centre - measured centre| in original pixels and in
cells (each axis divided by the token pitch there), measured as in
tests/helpers_geometry.py (probe images through the real processors).

    PYTHONPATH=src python benchmarks/geometry_error.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_5_vl")
SIZES = [(640, 480), (2304, 1728), (500, 300), (200, 640), (1000, 250), (97, 61)]


def pitch(tm, measured, tile: int) -> tuple[float, float]:
    """Median spacing of measured centres between neighbouring tokens of a grid."""
    rows = tm.tile == tile
    nr, nc = tm.grids[0][tile]
    cx = np.full((nr, nc), np.nan)
    cy = np.full((nr, nc), np.nan)
    cx[tm.row[rows], tm.col[rows]] = measured[rows, 1]
    cy[tm.row[rows], tm.col[rows]] = measured[rows, 2]
    return float(np.nanmedian(np.diff(cx, axis=1))), float(np.nanmedian(np.diff(cy, axis=0)))


def main() -> None:
    import torch
    from helpers_geometry import compare, real_geometry

    torch.set_num_threads(2)
    print("| family | image | view | grid | tokens | max px | mean px | max cells | mean cells |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in FAMILIES:
        model, proc = real_geometry(family)
        for size in SIZES:
            tm, measured, centre = compare(family, model, proc, size)
            for tile in sorted(tm.grids[0]):
                rows = (tm.tile == tile) & (measured[:, 0] > 0)
                d = centre[rows] - measured[rows, 1:3]
                px, py = pitch(tm, measured, tile)
                dist = np.hypot(d[:, 0], d[:, 1])
                cells = np.hypot(d[:, 0] / px, d[:, 1] / py)
                view = "base" if tile == 0 and family in ("llava_next", "llava_onevision") \
                    else ("high-res" if tile == 1 else "single")
                grid = "x".join(map(str, tm.grids[0][tile]))
                print(f"| {family} | {size[0]}x{size[1]} | {view} | {grid} | {rows.sum()} | "
                      f"{dist.max():.2f} | {dist.mean():.2f} | {cells.max():.3f} | "
                      f"{cells.mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
