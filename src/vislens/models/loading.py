"""Resolve "toy" / "toy-qwen" / a local HF directory to an unmodified transformers model.

The family is read from config.json (model_type), never guessed from names,
so a renamed directory still loads; what each family needs is declared in
vislens.models.families.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vislens.models.families import Family, family_for, supported

TOYS = {"toy": "toy", "toy-qwen": "toy_qwen"}


def assets_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets"


def resolve(model: str | Path) -> Path:
    """Directory of a toy name or a local path; clear error when it is not there."""
    name = str(model)
    if name in TOYS:
        path = assets_dir() / TOYS[name]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the {name!r} model is not installed at {path} (its weights are trained by "
                "`vislens` toy training and shipped with the package); reinstall vislens or "
                "pass a local Hugging Face directory")
        return path
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name!r} is neither 'toy', 'toy-qwen' nor a local Hugging Face directory with a "
            f"config.json (vislens never downloads; supported families: {supported()})")
    return path


def detect_family(path: Path) -> Family:
    config = json.loads((path / "config.json").read_text())
    try:
        return family_for(config.get("model_type"))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _family(family: Family | str) -> Family:
    return family if isinstance(family, Family) else family_for(family)


def load_processor(path: Path, family: Family | str):
    """AutoProcessor when it works; else the same processor class built from its parts.

    The fallback exists because OneVision / Qwen2.5-VL / InternVL processors require
    a video processor, which needs torchvision, and Pixtral's module imports it;
    images go through the real image processor and tokenizer either way.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    family = _family(family)
    try:
        return AutoProcessor.from_pretrained(path, **family.tokenizer_kwargs)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as err:
        if not (family.video_processor or family.torchvision_processor):
            raise ValueError(f"could not load the processor from {path}: {err}") from err
    from vislens.models.novideo import NoVideoProcessor, images_only

    kwargs: dict = {}
    cfg_file = path / "processor_config.json"
    if cfg_file.is_file():
        kwargs = {k: v for k, v in json.loads(cfg_file.read_text()).items()
                  if not isinstance(v, dict) and k not in ("processor_class", "auto_map")}
    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        file = path / name
        if file.is_file():
            text = file.read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    cls = family.processor_type()
    tokenizer = AutoTokenizer.from_pretrained(path, **family.tokenizer_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(path)
    if family.video_processor:
        cls = images_only(cls)
        kwargs["video_processor"] = NoVideoProcessor()
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
               **kwargs)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from its name; None (or "auto") keeps the checkpoint's own."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name in ("", "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16 "
                         "(or leave it out for the checkpoint's own)")
    return DTYPES[name]


def saved_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint was saved in (config `dtype` / `torch_dtype`), float32 if unsaid."""
    config = json.loads((path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or \
        (config.get("text_config") or {}).get("dtype") or "float32"
    return DTYPES.get(str(name).lower(), torch.float32)


def parse_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or one line saying why not (before any weight is read)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA "
                             "GPU; use --device cpu (or install a CUDA build of torch)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) "
                             "are visible")
    return dev


def parse_max_memory(text: str | dict | None) -> dict | None:
    """--max-memory "0=40GiB,1=40GiB,cpu=120GiB" -> accelerate's {0: "40GiB", ...}."""
    if text is None or isinstance(text, dict):
        return text
    out: dict = {}
    for part in str(text).split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"--max-memory {text!r}: give DEVICE=SIZE pairs, e.g. "
                             "0=40GiB,1=40GiB,cpu=120GiB")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def load_model(path: Path, family: Family | str, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None, device_map: str | dict | None = None,
               max_memory: str | dict | None = None, offload_folder: str | Path | None = None):
    """The transformers model, on one device, or spread by accelerate over several GPUs,
    the CPU and disk (`device_map` "auto" / "balanced" / an explicit {module: device})."""
    import transformers
    from safetensors import SafetensorError

    family = _family(family)
    cls = getattr(transformers, family.model_class or "AutoModelForImageTextToText")
    dtype = parse_dtype(dtype) or saved_dtype(path)
    attn = family.attn_implementation(json.loads((path / "config.json").read_text()))
    spread: dict = {}
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ValueError("--device-map needs accelerate: pip install accelerate") from None
        spread = {"device_map": device_map, "max_memory": parse_max_memory(max_memory)}
        if offload_folder is not None:
            spread["offload_folder"] = str(offload_folder)
    else:
        dev = parse_device(device)
    try:
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn, **spread)
    except (SafetensorError, OSError, EOFError) as err:
        raise ValueError(f"cannot read the weights in {path} ({one_line(err)}); the file is "
                         "incomplete or corrupt: copy the checkpoint again") from None
    return model.eval() if device_map is not None else model.to(dev).eval()


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(err).__name__
