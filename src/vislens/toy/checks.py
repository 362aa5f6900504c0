"""The toys' "does it really look?" check: ablate every image token with the mean one.

A forward pre-hook on the language model replaces the merged input embeddings
at image-token positions (as Neo et al.'s ablation does), leaving input ids,
pixels and positions untouched. Kept here, small, so training can verify its own
result without depending on the interventions package; works for both toys.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

REFERENCE_SEED = 107_777  # scenes the mean image token is taken over (never trained on)


@torch.no_grad()
def mean_projector_output(model, processor, images: Sequence) -> torch.Tensor:
    """Mean image token as the LM receives it (projector / merger output) over reference
    images: [D]. The image processor's outputs (pixels, and Qwen's `image_grid_thw`)
    are what `get_image_features` takes.

    Unlike vislens.interventions.mean_image_embedding (a loaded VLM; patch tokens only,
    newline slots left out; cached on disk), this averages every row the bare
    transformers model's projector returns, uncached: what training has at hand."""
    enc = processor.image_processor(images=list(images), return_tensors="pt")
    feats = model.model.get_image_features(**{k: v.to(model.device) for k, v in enc.items()})
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1]).mean(0)


@contextmanager
def replace_image_tokens(model, vector: torch.Tensor) -> Iterator[None]:
    """Inside the block, every image token reaches the LM as `vector`."""
    image_id = model.config.image_token_id
    seen: dict[str, torch.Tensor] = {}

    def grab_ids(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            seen["ids"] = ids

    def swap(_module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        ids = seen.get("ids")
        if embeds is None or ids is None or ids.shape != embeds.shape[:2]:
            return None  # cached decoding steps carry no image tokens
        where = (ids == image_id)[..., None]
        kwargs["inputs_embeds"] = torch.where(where, vector.to(embeds.dtype), embeds)
        return args, kwargs

    handles = [
        model.model.register_forward_pre_hook(grab_ids, with_kwargs=True),
        model.model.language_model.register_forward_pre_hook(swap, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def final_checks(model, processor, scenes) -> dict:
    """Held-out accuracy by generation, and the same with every image token ablated."""
    from vislens.data import shapesworld
    from vislens.experiments.accuracy import evaluate

    clean = evaluate(model, processor, scenes)
    reference = shapesworld.generate(64, seed=REFERENCE_SEED)
    mean = mean_projector_output(model, processor, [s.image for s in reference])
    with replace_image_tokens(model, mean):
        ablated = evaluate(model, processor, scenes)
    return {"held_out": {"scenes": len(scenes), "seed": scenes[0].meta["seed"],
                         "accuracy": clean["accuracy"]},
            "ablated_all_image_tokens": {"accuracy": ablated["accuracy"]}}
