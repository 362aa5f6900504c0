"""vislens: look inside vision-language models."""

__version__ = "0.1.0"


def load(model="toy", device="cpu", dtype=None, **spread):
    """Load "toy", "toy-qwen" or a local Hugging Face VLM directory (see vislens.models.load;
    `device_map`, `max_memory`, `offload_folder` spread it over devices)."""
    from vislens.models import load as _load

    return _load(model, device=device, dtype=dtype, **spread)


__all__ = ["__version__", "load"]
