"""What ablate, logit-lens and knockout share: the data option, target areas and
Neo et al.'s image selection, and what a run directory records (the model itself is
opened by model_options)."""

from __future__ import annotations

from vislens.cli.common import parse_area, positive

DATA_HELP = 'data set: "shapesworld[:SEED]" (embedded; default held-out world 1000, the ' \
    'toys trained on 0) or "coco:DIR" (COCO instances json + images)'
DEFAULT_DATA = "shapesworld:1000"
# target areas in original pixels: small objects for ablation / knockout (few object
# tokens), one large object for the logit lens; the COCO ranges are the paper's
AREAS = {
    "small": {"shapesworld": (0.0, 350.0), "coco": (1000.0, 2000.0)},
    "large": {"shapesworld": (350.0, float("inf")), "coco": (20000.0, 30000.0)},
}


def open_samples(data: str, n: int, area: str | None, which: str):
    """(samples, target area); COCO images are chosen as the paper did before any pixel
    is read (<= 3 annotations, no crowd, one object alone in its class, area range)."""
    positive("--n", n)
    from vislens.data import coco, open_dataset

    kind = data.partition(":")[0].lower()
    chosen = parse_area(area) if area else AREAS[which].get(kind)
    select = None
    if kind == "coco":
        select = coco.small_target(area=chosen) if which == "small" else \
            coco.large_object(area=chosen)
    samples = open_dataset(data, n=n, select=select)
    if not samples:
        raise ValueError(f"{data} holds no images; check the path or --n")
    return samples, chosen


def print_funnel(summary: dict) -> None:
    """The run's selection funnel on the console: images per step and setting, and where a
    setting lost every image (vislens.experiments.funnel)."""
    from vislens.cli.common import console
    from vislens.experiments.funnel import lines

    for line in lines(summary.get("funnel")):
        console.print(line, highlight=False)


def meta(opts, data: str, n: int, **extra) -> dict:
    """What a run directory records besides the experiment's own config; opts: the
    command's model_options.ModelOptions."""
    return {"model": opts.model, "data": data, "n": n, "device": opts.device,
            "dtype": opts.dtype, **extra}


def names(text: str) -> tuple[str, ...]:
    """A comma list option as a tuple of names."""
    return tuple(s.strip() for s in text.split(",") if s.strip())
