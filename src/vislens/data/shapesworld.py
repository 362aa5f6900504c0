"""ShapesWorld: seeded synthetic scenes with exact instance masks.

Every scene is drawn from its own generator seeded by (seed, index), so any
subset can be regenerated alone and two runs with the same seed are identical.
Masks are the exact pixels painted (no anti-aliasing), so "object tokens" are
known without annotation noise.

Within a scene every object has a different shape AND a different color: a
class name ("red circle") then names exactly one instance, the shape alone
and the color alone each identify the object too (what the VQA questions ask
about), and polling negatives can swap attributes between objects (binding).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from vislens.data.samples import Instance, Question, Sample

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "white": (245, 245, 245),
}
SIZES = {"small": (12, 18), "large": (26, 36)}  # object extent in pixels at 96 px
BACKGROUNDS = ((20, 20, 20), (45, 45, 50), (60, 55, 45), (30, 40, 55))
DEFAULT_SIZE = 96
TRAINING_SEEDS = (0,)  # the worlds the shipped toys were trained on (vislens.toy.train)
HELD_OUT_SEED = 1000  # the default world every command evaluates on

CAPTION_PROMPT = "describe this image ."
POLLING_PROMPT = "is there a {name} in this image ?"
VQA_SHAPE_PROMPT = "what shape is the {color} object ?"
VQA_SHAPE_PREFIX = "it is a"
VQA_COLOR_PROMPT = "what color is the {shape} ?"
VQA_COLOR_PREFIX = "it is"


def vocabulary() -> list[str]:
    """Every word ShapesWorld text uses, so a word-level tokenizer covers it all."""
    words: set[str] = set(SHAPES) | set(COLORS) | set(SIZES)
    for text in (
        CAPTION_PROMPT,
        POLLING_PROMPT.format(name="x"),
        VQA_SHAPE_PROMPT.format(color="x"),
        VQA_COLOR_PROMPT.format(shape="x"),
        VQA_SHAPE_PREFIX,
        VQA_COLOR_PREFIX,
        "a and yes no . , left right of above below the shape",
    ):
        words |= set(text.split())
    words.discard("x")
    return sorted(words)


def shape_mask(shape: str, cx: float, cy: float, extent: float, angle: float,
                canvas: int) -> np.ndarray:
    img = Image.new("1", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    r = extent / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square":
        draw.polygon(regular_polygon(cx, cy, r * 1.2, 4, angle + math.pi / 4), fill=1)
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
        draw.polygon(rotate_points(pts, cx, cy, angle * 0.3), fill=1)
    elif shape == "triangle":
        draw.polygon(regular_polygon(cx, cy + r * 0.15, r * 1.1, 3, angle - math.pi / 2), fill=1)
    elif shape == "star":
        outer = regular_polygon(cx, cy, r * 1.1, 5, angle - math.pi / 2)
        inner = regular_polygon(cx, cy, r * 0.45, 5, angle - math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=1)
    elif shape == "cross":
        w = r * 0.36
        bars = [
            [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
            [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)],
        ]
        for bar in bars:
            draw.polygon(rotate_points(bar, cx, cy, angle * 0.3), fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return np.array(img, dtype=bool)


def regular_polygon(cx: float, cy: float, r: float, n: int,
                    phase: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n),
             cy + r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def rotate_points(pts, cx, cy, a):
    c, s = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def make_scene(seed: int, index: int, size: int = DEFAULT_SIZE,
               n_objects: tuple[int, int] = (1, 4), textured: bool | None = None,
               change: dict[int, dict[str, str]] | None = None) -> Sample:
    """One deterministic scene; objects never overlap (masks are exact and whole).

    `change` maps an instance's index to a new {"shape": ..} and / or {"color": ..}: the
    scene's random draws are all made as without it (placement uses the original shape,
    the colour keeps its jitter), so everything but that object is the same pixels and
    masks (vislens.data.counterfactual builds causal-tracing pairs from it)."""
    rng = np.random.default_rng([seed, index])
    scale = size / DEFAULT_SIZE
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    colors = rng.choice(len(COLORS), size=n, replace=False)
    color_names = list(COLORS)
    bg = np.array(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], dtype=np.float32)
    if textured is None:
        textured = bool(rng.random() < 0.5)
    pixels = np.broadcast_to(bg, (size, size, 3)).copy()
    if textured:
        pixels += rng.normal(0, 6, size=(size, size, 1)).astype(np.float32)
    occupied = np.zeros((size, size), dtype=bool)
    instances: list[Instance] = []
    for shape_i, color_i in zip(shapes, colors, strict=True):
        size_name = "small" if rng.random() < 0.5 else "large"
        lo, hi = SIZES[size_name]
        for _attempt in range(50):
            extent = float(rng.uniform(lo, hi)) * scale
            margin = extent / 2 + 1
            cx, cy = rng.uniform(margin, size - margin, size=2)
            angle = float(rng.uniform(-0.3, 0.3))
            mask = shape_mask(SHAPES[shape_i], cx, cy, extent, angle, size)
            grown = np.zeros_like(mask)
            x0, y0, x1, y1 = _box(mask)
            grown[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = True
            if not (grown & occupied).any():
                break
        else:
            continue  # no room left: the scene keeps fewer objects
        occupied |= mask
        name, shape = color_names[color_i], SHAPES[shape_i]
        jitter = rng.integers(-12, 13, size=3)
        new = (change or {}).get(len(instances), {})
        if new.get("shape", shape) != shape:
            shape = new["shape"]
            mask = shape_mask(shape, cx, cy, extent, angle, size)
        name = new.get("color", name)
        pixels[mask] = np.array(COLORS[name], dtype=np.float32) + jitter
        instances.append(Instance(
            name=f"{name} {shape}", mask=mask, box=_box(mask),
            attributes={"shape": shape, "color": name, "size": size_name},
        ))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return Sample(id=f"sw-{seed}-{index}", image=image, instances=instances,
                  meta={"seed": seed, "index": index, "source": "shapesworld"})


def check_held_out(seed: int) -> None:
    """Refuse the toys' training world: scores there measure memorisation, not perception."""
    if seed in TRAINING_SEEDS:
        raise ValueError(f"shapesworld:{seed} is the world the shipped toys were trained on; "
                         f"evaluate on a held-out seed, e.g. shapesworld:{HELD_OUT_SEED}")


def generate(n: int, seed: int = HELD_OUT_SEED, size: int = DEFAULT_SIZE, start: int = 0,
             n_objects: tuple[int, int] = (1, 4)) -> list[Sample]:
    """Scenes `start .. start+n-1` of the world with this seed (by default the held-out
    world; the toys' training code asks for its world 0 by name)."""
    if n < 1:
        raise ValueError(f"need at least one scene, got n={n}; pass a positive --n")
    return [make_scene(seed, i, size=size, n_objects=n_objects) for i in range(start, start + n)]


def caption(sample: Sample) -> str:
    """Objects in the fixed shape order, so a caption is a function of the scene."""
    order = sorted(sample.instances, key=lambda inst: SHAPES.index(inst.attributes["shape"]))
    return " and ".join(f"a {inst.name}" for inst in order) + " ."


def questions(sample: Sample, setting: str, rng: np.random.Generator | None = None,
              target: int | None = None) -> list[Question]:
    """The questions one scene offers in a setting, about `target` (random if None).

    Polling returns one positive and one negative so yes / no stay balanced;
    the negative swaps attributes between present objects when it can (so
    the model must bind color to shape), else names an absent combination.
    """
    if not sample.instances:
        return []
    rng = rng if rng is not None else np.random.default_rng(
        [sample.meta.get("seed", 0), sample.meta.get("index", 0), 7])
    t = int(rng.integers(len(sample.instances))) if target is None else target
    inst = sample.instances[t]
    shape, color = inst.attributes["shape"], inst.attributes["color"]
    if setting == "generative":
        return [Question("generative", CAPTION_PROMPT, caption(sample), target=t,
                         kind="caption", target_name=inst.name)]
    if setting == "polling":
        positive = Question("polling", POLLING_PROMPT.format(name=inst.name), "yes",
                            target=t, kind="polling-positive", target_name=inst.name)
        neg_name, kind = _negative_name(sample, t, rng)
        negative = Question("polling", POLLING_PROMPT.format(name=neg_name), "no",
                            target=t, kind=kind, target_name=neg_name)
        return [positive, negative]
    if setting == "vqa":
        return [
            Question("vqa", VQA_SHAPE_PROMPT.format(color=color), shape,
                     answer_prefix=VQA_SHAPE_PREFIX, target=t, kind="vqa-shape",
                     target_name=inst.name),
            Question("vqa", VQA_COLOR_PROMPT.format(shape=shape), color,
                     answer_prefix=VQA_COLOR_PREFIX, target=t, kind="vqa-color",
                     target_name=inst.name),
        ]
    raise ValueError(f"unknown setting {setting!r}; choose generative, polling or vqa")


def _negative_name(sample: Sample, t: int, rng: np.random.Generator) -> tuple[str, str]:
    present = {inst.name for inst in sample.instances}
    inst = sample.instances[t]
    others = [o for i, o in enumerate(sample.instances) if i != t]
    if others and rng.random() < 0.6:
        other = others[int(rng.integers(len(others)))]
        if rng.random() < 0.5:
            return f"{inst.attributes['color']} {other.attributes['shape']}", "polling-swap"
        return f"{other.attributes['color']} {inst.attributes['shape']}", "polling-swap"
    while True:  # keep one attribute of the target, change the other to an absent one
        if rng.random() < 0.5:
            name = f"{inst.attributes['color']} {SHAPES[int(rng.integers(len(SHAPES)))]}"
        else:
            name = f"{list(COLORS)[int(rng.integers(len(COLORS)))]} {inst.attributes['shape']}"
        if name not in present:
            return name, "polling-absent"
