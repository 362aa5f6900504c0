"""One answer checker for every command: does a model's text name the expected thing?

A real model says "two giraffes", "a motorbike" or "Yes, there is": exact
class-name matching would count those as misses and silently drop samples. A
name therefore matches in any of its surface forms: itself, its plural, and the
synonyms listed below for COCO's classes (the words LLaVA-style models use for
them), each with its plural. Matching is on whole words of the normalised text.
"""

from __future__ import annotations

import re

ARTICLES = ("a", "an", "the")

# COCO class -> other names a caption uses for it (plurals are added by `plural`)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "people", "boy", "girl", "child", "kid", "player", "lady",
               "guy", "men", "women", "children"),
    "bicycle": ("bike",),
    "motorcycle": ("motorbike", "motor bike", "scooter"),
    "airplane": ("plane", "aeroplane", "aircraft", "jet", "airliner"),
    "bus": ("coach",),
    "car": ("vehicle", "sedan", "taxi"),
    "truck": ("lorry", "pickup"),
    "boat": ("ship", "sailboat", "canoe", "kayak"),
    "traffic light": ("traffic signal", "stoplight", "stop light"),
    "fire hydrant": ("hydrant",),
    "parking meter": ("meter",),
    "bird": ("pigeon", "seagull", "duck", "parrot"),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup"),
    "sheep": ("lamb",),
    "cow": ("cattle", "bull", "calf"),
    "backpack": ("back pack", "rucksack", "bag"),
    "handbag": ("purse", "bag"),
    "suitcase": ("luggage", "bag"),
    "sports ball": ("ball", "football", "soccer ball", "baseball", "tennis ball"),
    "skis": ("ski",),
    "baseball bat": ("bat",),
    "baseball glove": ("glove", "mitt"),
    "tennis racket": ("racket", "racquet"),
    "wine glass": ("glass",),
    "cup": ("mug",),
    "donut": ("doughnut",),
    "couch": ("sofa",),
    "potted plant": ("plant", "houseplant", "flower pot"),
    "bed": ("mattress",),
    "dining table": ("table",),
    "toilet": ("commode",),
    "tv": ("television", "monitor", "screen", "tv set"),
    "laptop": ("computer", "notebook"),
    "mouse": ("computer mouse",),
    "remote": ("remote control", "controller"),
    "keyboard": ("computer keyboard",),
    "cell phone": ("phone", "cellphone", "mobile phone", "smartphone", "mobile"),
    "microwave": ("microwave oven",),
    "refrigerator": ("fridge",),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer", "dryer"),
    "toothbrush": ("tooth brush",),
}

IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep",
             "skis": "skis", "man": "men", "woman": "women", "child": "children",
             "scissors": "scissors", "bus": "buses", "glass": "glasses"}


def plural(name: str) -> str:
    """English plural of the last word ("traffic light" -> "traffic lights")."""
    *head, last = name.split()
    if last in IRREGULAR:
        last = IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])


def surface_forms(name: str, synonyms: bool = True) -> list[str]:
    """Every way an answer may name `name`, normalised, longest first."""
    base = [normalise(name)]
    if synonyms:
        base += [normalise(s) for s in SYNONYMS.get(name.lower(), ())]
    forms = {f for b in base for f in (b, plural(b))}
    return sorted(forms, key=lambda f: (-len(f), f))


def head_words(name: str, synonyms: bool = True) -> list[str]:
    """The head (last) word of every surface form of `name`: what a single token can say
    of it ("traffic light" -> light, lights, signal, signals, stoplight, stoplights, ...;
    "hot dog" -> dog, dogs; never "traffic" or "hot")."""
    return sorted({form.split()[-1] for form in surface_forms(name, synonyms)})


def normalise(text: str) -> str:
    """Lower-case, punctuation split off, single spaces: how answers are compared."""
    text = re.sub(r"([.,?!:;()])", r" \1 ", text.lower())
    return " ".join(text.split())


def mentions(text: str, name: str, synonyms: bool = True) -> bool:
    """The generative rule: some surface form of `name` appears as whole words."""
    words = f" {normalise(text)} "
    return any(f" {form} " in words for form in surface_forms(name, synonyms))


def first_word(text: str, expected: str) -> bool:
    """The polling rule: the answer starts with "yes" (or "no")."""
    words = normalise(text).split()
    return bool(words) and words[0] == normalise(expected)


def starts_with(text: str, expected: str, synonyms: bool = True) -> bool:
    """The VQA rule: after an optional article, the answer's first words name `expected`."""
    words = normalise(text).split()
    if words and words[0] in ARTICLES:
        words = words[1:]
    return any(words[:len(form.split())] == form.split()
               for form in surface_forms(expected, synonyms))
