"""`vislens logit-lens`: Neo et al. A2, do image tokens become words."""

from __future__ import annotations

from pathlib import Path

import typer

from vislens.cli.common import console, emit, fmt, positive, progress_for
from vislens.cli.image_inputs import DATA_HELP, DEFAULT_DATA, meta, open_samples, print_funnel
from vislens.cli.model_options import ModelOptions, model_options, model_session


@model_options
def logit_lens(
    opts: ModelOptions,
    data: str = typer.Option(DEFAULT_DATA, help=DATA_HELP),
    n: int = typer.Option(60, "--n", help="number of images"),
    out: Path = typer.Option(Path("runs/logit-lens"), help="run directory (rerun to resume)"),
    top_k: int = typer.Option(5, help="tokens kept per layer and image token"),
    area: str = typer.Option("", help="target area range MIN:MAX in pixels, or neo (Neo et "
                             "al.'s lens set: COCO images holding one object, of 20000-30000 "
                             "px^2; the default on COCO data). Default on ShapesWorld: 350: "
                             "(the large shapes)"),
    viewers: int = typer.Option(3, help="interactive HTML viewers for the first N images"),
    seed: int = typer.Option(0, help="seed for choosing targets"),
    batch_size: int = typer.Option(4, help="images per forward pass"),
) -> None:
    """Decode every image token at every layer (final norm + unembedding, applied once).

    Reports how many object patches (any overlap with the target's mask) have a token of
    the object's head word (or a listed synonym's, plurals included) in their top-k at
    some layer, at which layer, per-layer curves and background false alarms; writes an
    interactive viewer per image.

    Example: vislens logit-lens --model toy --n 60 --out runs/lens --viewers 3
    """
    with model_session(opts) as load:
        positive("--top-k", top_k)
        positive("--batch-size", batch_size)
        from vislens.experiments import logit_lens as lens

        if area.strip().lower() == "neo":
            if data.partition(":")[0].lower() != "coco":
                raise ValueError("--area neo is Neo et al.'s COCO lens set; give --data "
                                 "coco:DIR (COCO val), or --area MIN:MAX")
            area = "{:g}:{:g}".format(*lens.AREAS["coco"])
        samples, chosen = open_samples(data, n, area or None, "large")
        config = lens.LensConfig(top_k=top_k, area=chosen, viewers=viewers, seed=seed,
                                 batch_size=batch_size)
        vlm = load()
        summary = lens.execute(vlm, samples, config, out, meta(opts, data, n),
                               progress=progress_for(opts.as_json))
        if opts.as_json:
            emit(summary, True)
            return
        print_funnel(summary)
        if not summary["layout"]:
            console.print(f"no token layout for this family: image tokens decoding to the "
                          f"target's word at some layer: {summary['image_hit_rate']:.1%} of "
                          f"{summary['n_image_tokens']} (object / background split and "
                          "viewers need a layout)")
            return
        lo, hi = summary.get("hit_rate_ci95") or (None, None)
        console.print(
            f"object patches decoding to their word at some layer: {summary['hit_rate']:.1%} "
            f"(95% CI {fmt(lo)}-{fmt(hi)}; background: {summary['background_rate']:.1%}); "
            f"mean best layer {fmt(summary['peak_layer_mean'], 1)} of {summary['n_layers']}")
        for page in summary["viewer"]:
            console.print(f"viewer: {page}")
