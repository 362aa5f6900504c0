"""ImageNet layouts: class folders (reference image sets) and ImageNet-S masks.

The mean post-adapter embedding of Neo et al. is taken over ImageNet val images;
`load_image_folder` reads the usual `<root>/<synset>/<image>` layout for that.
ImageNet-S stores semantic masks as RGB PNGs whose class id is R + 256 * G
(0 = background, 1000 = ignore), next to the images in the same class folders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vislens.data._io import IMAGE_SUFFIXES, read_image, sorted_files
from vislens.data.samples import Sample, SemanticMap
from vislens.data.semantic import semantic_map

IMAGENET_S_IGNORE = 1000


def read_synset_names(path: str | Path) -> dict[str, str]:
    """`n01440764 tench, Tinca tinca` lines (LOC_synset_mapping.txt) -> {synset: "tench"}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synset list {path} not found")
    names = {}
    for line in path.read_text().splitlines():
        wnid, _, words = line.strip().partition(" ")
        if wnid:
            names[wnid] = words.split(",")[0].strip() or wnid
    return names


def load_image_folder(root: str | Path, per_class: int | None = None, limit: int | None = None,
                      names: dict[str, str] | str | Path | None = None) -> list[Sample]:
    """Images of `<root>/<class>/*` (or of a flat `<root>/*`), classes and files in name order.

    meta: label (the folder name, e.g. a synset), class_name (from `names`, a
    dict or a synset mapping file, else the folder name). `per_class` keeps the
    first images of each class (balanced reference sets), `limit` caps the total.
    All of them are read into memory: `ImageFolder` reads the same files one at a time.
    """
    return list(ImageFolder(root, per_class, limit, names).samples())


class ImageFolder:
    """The files of an image folder (same layout and order as `load_image_folder`), read one
    at a time each time it is iterated.

    A reference set for a mean embedding can be the 50,000 ImageNet val images: as a
    list they would all be in memory at once. Iterating yields PIL images (what
    `mean_image_embedding` takes), `samples()` yields Samples; the file list is made,
    and a missing or empty folder refused, when the folder is opened, before any
    pixel is read.
    """

    def __init__(self, root: str | Path, per_class: int | None = None,
                 limit: int | None = None, names: dict[str, str] | str | Path | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} not found")
        if names is not None and not isinstance(names, dict):
            names = read_synset_names(names)
        self.names = names or {}
        self.files: list[tuple[str, Path]] = []
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
        for class_dir in class_dirs or [root]:  # a flat folder is one unlabeled class
            label = class_dir.name if class_dirs else ""
            self.files += [(label, path) for path in
                           sorted_files(class_dir, IMAGE_SUFFIXES)[:per_class]]
        self.files = self.files[:limit]
        if not self.files:
            raise ValueError(f"no images under {root}; expected <root>/<class>/*.jpg or "
                             "<root>/*.jpg")

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        return (read_image(path) for _, path in self.files)

    def samples(self):
        for label, path in self.files:
            yield Sample(id=f"{label}/{path.stem}" if label else path.stem,
                         image=read_image(path),
                         meta={"label": label, "file": str(path),
                               "class_name": self.names.get(label, label),
                               "source": "imagenet"})


def load_imagenet_s(root: str | Path, split: str = "validation",
                    categories: list[str] | str | Path | None = None,
                    names: dict[str, str] | str | Path | None = None,
                    limit: int | None = None) -> list[SemanticMap]:
    """ImageNet-S masks `<root>/<split>-segmentation/<synset>/<name>.png` with their images
    `<root>/<split>/<synset>/<name>.*`.

    `categories` lists the class of each id from 1 (a list, or a file with one
    synset per line such as ImageNetS_categories_im919.txt); `names` turns
    synsets into words (LOC_synset_mapping.txt). Both are found in `root` when not
    given (the command line has no option for them); without categories, class i
    is named "class i", which no text feature can match.
    """
    root = Path(root)
    if categories is None:
        found = sorted(root.glob("ImageNetS_categories_im*.txt"))
        categories = found[-1] if found else None
    if names is None and (root / "LOC_synset_mapping.txt").is_file():
        names = root / "LOC_synset_mapping.txt"
    seg_dir, img_dir = root / f"{split}-segmentation", root / split
    if not seg_dir.is_dir():
        raise FileNotFoundError(f"{seg_dir} not found; pass the ImageNet-S folder "
                                f"(with {split}/ and {split}-segmentation/)")
    if categories is not None and not isinstance(categories, list):
        cat_path = Path(categories)
        if not cat_path.is_file():
            raise FileNotFoundError(f"category list {cat_path} not found")
        categories = [ln.split()[0] for ln in cat_path.read_text().splitlines() if ln.strip()]
    if names is not None and not isinstance(names, dict):
        names = read_synset_names(names)
    masks = sorted(seg_dir.glob("*/*.png"))
    if not masks:
        raise ValueError(f"no masks in {seg_dir}; expected <synset>/<name>.png files")
    masks = masks[:limit] if limit else masks
    out = []
    for mask_path in masks:
        labels = read_imagenet_s_mask(mask_path)
        synset = mask_path.parent.name
        image_path = _sibling_image(img_dir / synset, mask_path.stem)
        if categories is None:
            n = max(int(labels[labels != IMAGENET_S_IGNORE].max(initial=0)), 0)
            classes = ["background"] + [f"class {i}" for i in range(1, n + 1)]
        else:
            classes = ["background"] + [(names or {}).get(c, c) for c in categories]
        out.append(semantic_map(f"{synset}/{mask_path.stem}", read_image(image_path), labels,
                                classes, IMAGENET_S_IGNORE,
                                {"source": "imagenet-s", "label": synset}))
    return out


def read_imagenet_s_mask(path: Path) -> np.ndarray:
    """Class ids R + 256 * G of an ImageNet-S mask PNG."""
    rgb = np.asarray(read_image(path, "RGB")).astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1]


def _sibling_image(folder: Path, stem: str) -> Path:
    for suffix in (".JPEG", ".jpg", ".jpeg", ".png", ".JPG"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(f"image {stem} not found in {folder}")
