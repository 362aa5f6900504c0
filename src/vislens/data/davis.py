"""DAVIS: JPEGImages/<res>/<video>/*.jpg with Annotations/<res>/<video>/*.png palette masks.

Palette index k > 0 is object k (DAVIS 2017); a grey 0/255 mask (DAVIS 2016)
is one object. Frames without an annotation file (test sets annotate only the
first frame) come without instances and meta["annotated"] = False.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vislens.data._io import (
    IMAGE_SUFFIXES,
    mask_box,
    open_image,
    read_image,
    read_index_png,
    sorted_files,
)
from vislens.data.samples import Instance, Sample, Video

VOID = 255


def load_davis(root: str | Path, resolution: str = "480p", split: str | None = None,
               videos: list[str] | None = None, limit: int | None = None,
               max_frames: int | None = None) -> list[Video]:
    """Videos named by `videos`, else by ImageSets/<split>.txt (e.g. split="2017/val"),
    else every folder; `max_frames` keeps the first frames of each."""
    root = Path(root)
    frames_root = root / "JPEGImages" / resolution
    if not frames_root.is_dir():
        raise FileNotFoundError(f"{frames_root} not found; pass the DAVIS folder "
                                f"(with JPEGImages/{resolution}/)")
    if videos is None and split is not None:
        listing = root / "ImageSets" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing} not found; pass an existing split such as 2017/val")
        videos = [v.strip() for v in listing.read_text().splitlines() if v.strip()]
    if videos is None:
        videos = sorted(p.name for p in frames_root.iterdir() if p.is_dir())
    if not videos:
        raise ValueError(f"no videos under {frames_root}")
    videos = videos[:limit] if limit else videos
    return [_video(root, resolution, name, max_frames) for name in videos]


def _video(root: Path, resolution: str, name: str, max_frames: int | None) -> Video:
    folder = root / "JPEGImages" / resolution / name
    if not folder.is_dir():
        raise FileNotFoundError(f"video {name} not found in {folder.parent}")
    files = sorted_files(folder, IMAGE_SUFFIXES)[:max_frames]
    if not files:
        raise ValueError(f"video {name} has no frames in {folder}")
    frames = []
    for t, path in enumerate(files):
        ann = root / "Annotations" / resolution / name / f"{path.stem}.png"
        image = read_image(path)
        meta = {"source": "davis", "video": name, "frame": t, "annotated": ann.is_file()}
        instances = []
        if ann.is_file():
            labels = read_index_png(ann)
            if labels.shape != (image.height, image.width):
                raise ValueError(f"{ann} is {labels.shape[::-1]} but its frame is {image.size}")
            if _is_binary_grey(ann, labels):
                labels = (labels > 0).astype(np.uint8)
            elif (labels == VOID).any():
                meta["void"] = labels == VOID
            for k in np.unique(labels):
                if k in (0, VOID):
                    continue
                mask = labels == k
                instances.append(Instance(f"object {int(k)}", mask, mask_box(mask),
                                          {"object_id": str(int(k))}))
        frames.append(Sample(f"{name}/{path.stem}", image, instances, meta))
    return Video(id=name, frames=frames, meta={"source": "davis", "resolution": resolution})


def _is_binary_grey(path: Path, labels: np.ndarray) -> bool:
    with open_image(path, path) as img:
        return img.mode == "L" and set(np.unique(labels).tolist()) <= {0, 255}
