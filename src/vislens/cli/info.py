"""`vislens info`: what a model is, read from the loaded model itself."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vislens.cli.common import JSON_OPTION, MODEL_OPTION, emit, quiet, user_errors


def info(
    model: str = MODEL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Describe a model: family, layers, sizes, image-token grid, where the weights live.

    Example: vislens info --model toy-qwen
    """
    with user_errors(), quiet(as_json):
        from vislens.models import load

        vlm = load(model)
        facts = describe(vlm, model)
        if as_json:
            emit(facts, True)
            return
        table = Table(show_header=False)
        for key, value in facts.items():
            table.add_row(key, str(value))
        Console().print(table)


def describe(vlm, model: str) -> dict:
    """Facts a researcher checks before trusting a run, read from the loaded model itself."""
    from PIL import Image

    from vislens.data.shapesworld import DEFAULT_SIZE
    from vislens.models.loading import resolve

    text = vlm.language_model.config
    examples = {}
    for label, (w, h) in (("ShapesWorld scene", (DEFAULT_SIZE, DEFAULT_SIZE)),
                          ("photo", (640, 480))):
        batch = vlm.prepare([Image.new("RGB", (w, h))], ["describe this image ."])
        tm = batch.token_map
        examples[f"{w}x{h} ({label})"] = {
            "image_tokens": len(tm) + len(tm.newline_positions(0)),
            "grid": {str(t): list(rc) for t, rc in tm.grids[0].items()}}
    return {
        "model": model,
        "family": vlm.model_type,
        "layers": vlm.num_layers,
        "hidden_size": text.hidden_size,
        "attention_heads": text.num_attention_heads,
        "vocab_size": text.vocab_size,
        "native_image_size": vlm.native_image_size(),
        "image_tokens_for": examples,
        "parameters": sum(p.numel() for p in vlm.model.parameters()),
        "dtype": str(vlm.dtype).replace("torch.", ""),
        "weights": str(resolve(model).resolve()),
    }
