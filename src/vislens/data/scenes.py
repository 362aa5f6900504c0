"""Render ShapesWorld objects from explicit parameters (for the derived tasks).

`shapesworld.make_scene` draws random scenes; the part-B tasks need control
instead: the same object moved, scaled or recolored (correspondence, video),
or drawn with a fill style (multiple choice). This module draws with the very
same shape rasteriser, so a rendered object looks exactly like a ShapesWorld
one, and gives each shape's keypoints (vertices and center) in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vislens.data._io import mask_box
from vislens.data.samples import Instance, Sample
from vislens.data.shapesworld import (
    COLORS,
    DEFAULT_SIZE,
    regular_polygon,
    rotate_points,
    shape_mask,
)

FILLS = ("solid", "outline", "striped")


@dataclass
class ObjectSpec:
    """One object: what it is, where, how big (extent in px), and how it is painted."""

    shape: str
    color: str
    cx: float
    cy: float
    extent: float
    angle: float = 0.0
    fill: str = "solid"

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def mask(self, size: int) -> np.ndarray:
        return shape_mask(self.shape, self.cx, self.cy, self.extent, self.angle, size)

    def keypoints(self) -> np.ndarray:
        """Center then vertices, float (x, y) [K, 2]; they move with the object exactly."""
        return shape_keypoints(self.shape, self.cx, self.cy, self.extent, self.angle)


def shape_keypoints(shape: str, cx: float, cy: float, extent: float,
                    angle: float = 0.0) -> np.ndarray:
    """Same geometry as `shapesworld.shape_mask`: center, then the outline's corners/tips."""
    r = extent / 2
    if shape == "circle":
        pts = [(cx + r, cy), (cx, cy + r), (cx - r, cy), (cx, cy - r)]
    elif shape == "square":
        pts = regular_polygon(cx, cy, r * 1.2, 4, angle + math.pi / 4)
    elif shape == "diamond":
        pts = rotate_points([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)],
                      cx, cy, angle * 0.3)
    elif shape == "triangle":
        pts = regular_polygon(cx, cy + r * 0.15, r * 1.1, 3, angle - math.pi / 2)
    elif shape == "star":
        pts = regular_polygon(cx, cy, r * 1.1, 5, angle - math.pi / 2)
    elif shape == "cross":
        pts = rotate_points([(cx + r, cy), (cx, cy + r), (cx - r, cy), (cx, cy - r)],
                      cx, cy, angle * 0.3)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.array([(cx, cy), *pts], dtype=np.float64)


def fill_pattern(mask: np.ndarray, fill: str) -> np.ndarray:
    """The pixels a fill style paints inside the object's mask."""
    if fill == "solid":
        return mask
    if fill == "outline":
        inner = mask.copy()
        for _ in range(2):  # erode twice with the 4-neighbourhood: a 2 px outline
            shrunk = inner.copy()
            shrunk[1:, :] &= inner[:-1, :]
            shrunk[:-1, :] &= inner[1:, :]
            shrunk[:, 1:] &= inner[:, :-1]
            shrunk[:, :-1] &= inner[:, 1:]
            shrunk[0, :] = shrunk[-1, :] = shrunk[:, 0] = shrunk[:, -1] = False
            inner = shrunk
        return mask & ~inner
    if fill == "striped":
        ys, xs = np.indices(mask.shape)
        return mask & (((xs + ys) // 3) % 2 == 0)
    raise ValueError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")


def render(objects: list[ObjectSpec], sample_id: str, size: int = DEFAULT_SIZE,
           background: tuple[int, int, int] = (20, 20, 20), meta: dict | None = None,
           drop_hidden: bool = True) -> Sample:
    """Paint objects in order (later ones occlude earlier ones).

    Instance masks are each object's VISIBLE shape region (fill styles paint
    only part of it). Objects hidden entirely are dropped unless drop_hidden
    is False. attributes: shape, color, fill, object_id (1-based list order).
    """
    pixels = np.broadcast_to(np.array(background, np.uint8), (size, size, 3)).copy()
    masks: list[np.ndarray] = []
    for obj in objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown color {obj.color!r}; choose one of {', '.join(COLORS)}")
        region = obj.mask(size)
        for earlier in masks:
            earlier &= ~region
        masks.append(region)
        painted = fill_pattern(region, obj.fill)
        pixels[region] = background
        pixels[painted] = COLORS[obj.color]
    instances = []
    for k, (obj, mask) in enumerate(zip(objects, masks, strict=True), start=1):
        if drop_hidden and not mask.any():
            continue
        instances.append(Instance(
            name=obj.name, mask=mask, box=mask_box(mask),
            attributes={"shape": obj.shape, "color": obj.color, "fill": obj.fill,
                        "object_id": str(k)}))
    return Sample(id=sample_id, image=Image.fromarray(pixels, "RGB"), instances=instances,
                  meta=dict(meta or {}))
