"""Dataset specs on the command line ("shapesworld:3", "coco:/data/coco") -> samples."""

from __future__ import annotations

from vislens.data import shapesworld
from vislens.data.samples import Sample

DEFAULT_N = 100
SPECS = "shapesworld, shapesworld:SEED, coco:DIR_OR_JSON"


def open_dataset(spec: str, n: int | None = None, images_dir: str | None = None) -> list[Sample]:
    """Resolve a dataset spec. `n` = number of scenes (ShapesWorld, default 100) or limit (COCO)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "shapesworld":
        try:
            seed = int(arg) if arg else 0
        except ValueError:
            raise ValueError(f"bad ShapesWorld seed {arg!r} in {spec!r}; "
                             "use shapesworld:SEED with an integer seed") from None
        return shapesworld.generate(n or DEFAULT_N, seed=seed)
    if kind == "coco":
        if not arg:
            raise ValueError("coco needs a path: use coco:DIR or coco:instances.json")
        from vislens.data.coco import load_coco

        return load_coco(arg, images_dir=images_dir, limit=n)
    raise ValueError(f"unknown dataset {spec!r}; use one of: {SPECS}")
