"""Which samples an experiment keeps, as in Neo et al.'s protocol.

A target must be the only instance of its class (so "the object" is
unambiguous) and lie in an area range (small objects: few object tokens).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vislens.data.samples import Sample


def choose_target(sample: Sample, area: tuple[float, float] | None,
                  rng: np.random.Generator) -> int | None:
    """A random instance that is alone in its class and within the area range, if any."""
    names = [inst.name for inst in sample.instances]
    ok = [
        i for i, inst in enumerate(sample.instances)
        if names.count(inst.name) == 1
        and (area is None or area[0] <= inst.area <= area[1])
    ]
    if not ok:
        return None
    return ok[int(rng.integers(len(ok)))]


def choose_targets(samples: list[Sample], area: tuple[float, float] | None,
                   rng: np.random.Generator) -> list[int | None]:
    """One target per sample (None where none qualifies); an error when none does anywhere,
    instead of an empty table."""
    targets = [choose_target(s, area, rng) for s in samples]
    if samples and all(t is None for t in targets):
        where = "" if area is None else f" with an area in [{area[0]:g}, {area[1]:g}] px"
        raise ValueError(f"no image has a target object that is the only one of its class"
                         f"{where}; widen it with --area MIN:MAX or use other images")
    return targets


def noise_object(image: Image.Image, mask: np.ndarray, seed: int) -> Image.Image:
    """The image with the object's pixels replaced by uniform noise (the context stays)."""
    pixels = np.array(image.convert("RGB"))
    if mask.shape != pixels.shape[:2]:
        raise ValueError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{pixels.shape[1]}x{pixels.shape[0]}; masks must be in original image pixels"
        )
    rng = np.random.default_rng(seed)
    pixels[mask] = rng.integers(0, 256, size=(int(mask.sum()), 3), dtype=np.uint8)
    return Image.fromarray(pixels)
