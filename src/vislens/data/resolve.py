"""Dataset specs on the command line ("shapesworld:3", "coco:/data/coco") -> records.

`open_dataset` gives Samples (part-A experiments); `open_task` gives the record
type of one part-B task, from ShapesWorld or from that task's native benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vislens.data import shapesworld
from vislens.data.samples import Sample

DEFAULT_N = 100
SPECS = "shapesworld, shapesworld:SEED, coco:DIR_OR_JSON, imagenet:DIR"


def open_dataset(spec: str, n: int | None = None, images_dir: str | None = None,
                 select=None) -> list[Sample]:
    """Resolve a dataset spec. `n` = number of scenes (ShapesWorld, default 100) or limit.

    imagenet:DIR reads class folders (or a flat folder) of images without
    instances: the reference set for mean-embedding ablation vectors. `select`
    filters COCO images on their annotations before any pixel is read
    (vislens.data.coco.small_target / large_object); crowd regions are kept as instances
    (they count toward the selection's annotations, as in Neo et al.'s code).
    """
    kind, arg = _split(spec)
    if kind == "shapesworld":
        return shapesworld.generate(n or DEFAULT_N, seed=_seed(arg, spec))
    if kind == "coco":
        from vislens.data.coco import load_coco

        return load_coco(_path(arg, kind), images_dir=images_dir, limit=n, select=select)
    if kind == "imagenet":
        from vislens.data.imagenet import load_image_folder

        return load_image_folder(_path(arg, kind), limit=n)
    raise ValueError(f"unknown dataset {spec!r}; use one of: {SPECS}")


def reference_images(spec: str, n: int | None = None):
    """The images of a dataset spec for a mean embedding, iterable more than once.

    imagenet:DIR is read lazily, one image at a time on each pass (an `ImageFolder`),
    so a reference set of any size never sits in memory; other specs are read as
    `open_dataset` reads them.
    """
    kind, arg = _split(spec)
    if kind == "imagenet":
        from vislens.data.imagenet import ImageFolder

        return ImageFolder(_path(arg, kind), limit=n)
    return [s.image for s in open_dataset(spec, n)]


TASKS: dict[str, tuple[str, ...]] = {  # task -> native formats it reads besides ShapesWorld
    "fewshot": ("voc",),
    "coseg": ("voc", "imagenet-s"),
    "semantic": ("imagenet-s", "voc"),
    "referring": ("refcoco",),
    "correspondence": ("spair",),
    "video": ("davis",),
    "multiple-choice": ("blink",),
}


def open_task(task: str, spec: str = "shapesworld", n: int | None = None,
              **options: Any) -> list:
    """Records of a part-B task: e.g. open_task("fewshot", "voc:/data/VOC2012", n=200).

    ShapesWorld specs ("shapesworld[:SEED]") build the task's synthetic version
    with `n` items (default 100); native specs load at most `n` items (all if
    None). `options` go to the builder/loader (shots=, by=, kind=, split=, ...).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    kind, arg = _split(spec)
    if kind == "shapesworld":
        from vislens.data import tasks

        builders: dict[str, Callable[..., list]] = {
            "fewshot": tasks.few_shot_episodes, "coseg": tasks.cosegmentation_sets,
            "semantic": tasks.semantic_maps, "referring": tasks.referring_expressions,
            "correspondence": tasks.correspondence_pairs, "video": tasks.videos,
            "multiple-choice": tasks.multiple_choice,
        }
        return builders[task](n or DEFAULT_N, seed=_seed(arg, spec), **options)
    if kind not in TASKS[task]:
        readable = ", ".join(f"{k}:PATH" for k in TASKS[task])
        raise ValueError(f"task {task} reads shapesworld[:SEED] or {readable}; got {spec!r}")
    path = _path(arg, kind)
    if task in ("fewshot", "coseg"):
        from vislens.data import tasks

        maps = _semantic(kind, path, options.pop("limit", None), options)
        build = tasks.episodes_from_maps if task == "fewshot" else tasks.cosegmentation_from_maps
        return build(maps, n or DEFAULT_N, **options)
    if task == "semantic":
        return _semantic(kind, path, n, options)
    if task == "referring":
        from vislens.data.refcoco import load_refcoco

        return load_refcoco(path, limit=n, **options)
    if task == "correspondence":
        from vislens.data.spair import load_spair

        return load_spair(path, limit=n, **options)
    if task == "video":
        from vislens.data.davis import load_davis

        return load_davis(path, limit=n, **options)
    from vislens.data.blink import load_blink

    return load_blink(path, limit=n, **options)


def _semantic(kind: str, path: str, limit: int | None, options: dict) -> list:
    loader_keys = {"voc": ("split", "classes"), "imagenet-s": ("split", "categories", "names")}
    loader_options = {k: options.pop(k) for k in loader_keys[kind] if k in options}
    if kind == "voc":
        from vislens.data.voc import load_voc

        return load_voc(path, limit=limit, **loader_options)
    from vislens.data.imagenet import load_imagenet_s

    return load_imagenet_s(path, limit=limit, **loader_options)


def _split(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    return kind.strip().lower(), arg


def _seed(arg: str, spec: str) -> int:
    """The world of a ShapesWorld spec: held out from the toys' training by default, and
    never their training world."""
    try:
        seed = int(arg) if arg else shapesworld.HELD_OUT_SEED
    except ValueError:
        raise ValueError(f"bad ShapesWorld seed {arg!r} in {spec!r}; "
                         "use shapesworld:SEED with an integer seed") from None
    shapesworld.check_held_out(seed)
    return seed


def _path(arg: str, kind: str) -> str:
    if not arg:
        raise ValueError(f"{kind} needs a path: use {kind}:PATH")
    return arg
