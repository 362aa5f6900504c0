"""The records every loader produces and every experiment consumes.

One shape for all data (ShapesWorld, COCO, VOC, ...) so experiments never care
where an image came from: masks and boxes are always in ORIGINAL image pixels;
models map them to tokens themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SETTINGS = ("generative", "polling", "vqa")


@dataclass
class Instance:
    """One object in an image. `name` is its class name as a person would say it."""

    name: str
    mask: np.ndarray  # bool [H, W], original image pixels
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Sample:
    id: str
    image: Image.Image
    instances: list[Instance] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def instances_named(self, name: str) -> list[Instance]:
        return [inst for inst in self.instances if inst.name == name]


@dataclass(frozen=True)
class Question:
    """A prompt with its own correctness rule (the three settings of Neo et al.).

    `answer_prefix` is text the assistant turn already starts with (VQA's
    "it is a"), so the model's continuation is judged, not the prefix.
    """

    setting: str  # one of SETTINGS
    prompt: str
    answer: str
    answer_prefix: str = ""
    target: int | None = None  # index into Sample.instances
    kind: str = ""
    target_name: str = ""  # class name the generative rule looks for

    def is_correct(self, generated: str) -> bool:
        text = normalise(generated)
        if self.setting == "generative":
            name = normalise(self.target_name or self.answer)
            return re.search(rf"(^|\s){re.escape(name)}(\s|$)", text) is not None
        words = text.split()
        expected = normalise(self.answer).split()
        return words[: len(expected)] == expected


def normalise(text: str) -> str:
    """Lower-case, punctuation split off, single spaces: how answers are compared."""
    text = re.sub(r"([.,?!:;])", r" \1 ", text.lower())
    return " ".join(text.split())
