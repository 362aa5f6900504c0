"""The records every loader produces and every experiment consumes.

One shape for all data (ShapesWorld, COCO, VOC, ...) so experiments never care
where an image came from: masks and boxes are always in ORIGINAL image pixels;
models map them to tokens themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vislens.data import answers

SETTINGS = ("generative", "polling", "vqa")


@dataclass
class Instance:
    """One object in an image. `name` is its class name as a person would say it."""

    name: str
    mask: np.ndarray  # bool [H, W], original image pixels
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    attributes: dict[str, str] = field(default_factory=dict)
    annotated_area: float | None = None  # the data set's own area (COCO `area`), if it has one

    @property
    def area(self) -> float:
        """The one area every rule uses: the data set's own (COCO's `area` field, which
        selection reads before any pixel), else the mask's pixel count (ShapesWorld)."""
        if self.annotated_area is not None:
            return float(self.annotated_area)
        return int(self.mask.sum())


class SampleList(list):
    """Samples, plus how many images were read to find them: a loader that selects images
    on their annotations before reading pixels (COCO) reads more than it returns, and the
    selection funnel (vislens.experiments.funnel) starts from that count."""

    def __init__(self, items=(), read: int | None = None):
        super().__init__(items)
        self.read = len(self) if read is None else int(read)


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
        """The setting's rule (vislens.data.answers): names in any surface form count."""
        if self.setting == "generative":
            return answers.mentions(generated, self.target_name or self.answer)
        if self.setting == "polling":
            return answers.first_word(generated, self.answer)
        return answers.starts_with(generated, self.answer)

    def settled(self, generated: str) -> bool:
        """Whether `is_correct` gives every continuation of `generated` the verdict it gives
        `generated` itself (the rules and their proofs: vislens.data.answers), so generation
        may stop here. False says only that it might still change."""
        if self.setting == "generative":
            return answers.mentions_settled(generated, self.target_name or self.answer)
        if self.setting == "polling":
            return answers.first_word_settled(generated, self.answer)
        return answers.starts_with_settled(generated, self.answer)


# Task records of Liu et al. (part B). Ground truth is explicit in every record so
# an experiment scores against it without knowing the data's origin.


@dataclass
class FewShotEpisode:
    """Pascal-5i style: learn class `name` from masked support shots, segment the queries.

    Masks are the class's foreground (bool [H, W]) in each image's own pixels.
    """

    name: str
    support: list[Sample]
    support_masks: list[np.ndarray]
    query: list[Sample]
    query_masks: list[np.ndarray]


@dataclass
class CoSegmentationSet:
    """MSRC style: images sharing one object class; masks are that class's pixels."""

    name: str
    samples: list[Sample]
    masks: list[np.ndarray]


@dataclass
class SemanticMap:
    """Per-pixel class ids of one image (ImageNet-S / VOC style).

    classes[i] names label id i (classes[0] is the background); pixels equal to
    `ignore_index` are not scored. The sample's instances hold one union mask
    per present class, so ablation-style experiments can use the same image.
    """

    sample: Sample
    classes: list[str]
    labels: np.ndarray  # int [H, W]
    ignore_index: int = 255

    def present(self) -> list[str]:
        """Class names with at least one pixel, background excluded, in id order."""
        ids = [int(i) for i in np.unique(self.labels) if i not in (0, self.ignore_index)]
        return [self.classes[i] for i in ids if i < len(self.classes)]

    def mask(self, name: str) -> np.ndarray:
        return self.labels == self.classes.index(name)


@dataclass
class ReferringExpression:
    """RefCOCO style: an expression that picks out one instance of the sample."""

    id: str
    sample: Sample
    expression: str
    target: int  # index into sample.instances
    kind: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        return self.sample.instances[self.target].mask


@dataclass
class CorrespondencePair:
    """SPair-71k style: keypoints of one object seen in two images, row k <-> row k.

    Points are (x, y) floats in each image's own pixels. PCK@alpha counts a
    predicted target point correct within alpha * max(w, h) of `target_box`.
    """

    id: str
    source: Sample
    target: Sample
    source_points: np.ndarray  # float [K, 2]
    target_points: np.ndarray  # float [K, 2]
    source_box: tuple[float, float, float, float]  # x0, y0, x1, y1
    target_box: tuple[float, float, float, float]
    category: str = ""
    meta: dict = field(default_factory=dict)

    def pck(self, predicted: np.ndarray, alpha: float = 0.1) -> float:
        """Fraction of predicted target points within the PCK threshold."""
        x0, y0, x1, y1 = self.target_box
        threshold = alpha * max(x1 - x0, y1 - y0)
        dist = np.linalg.norm(np.asarray(predicted, float) - self.target_points, axis=-1)
        return float((dist <= threshold).mean()) if len(dist) else float("nan")


@dataclass
class Video:
    """DAVIS style: frames in order; an object keeps attributes["object_id"] across frames."""

    id: str
    frames: list[Sample]
    meta: dict = field(default_factory=dict)

    def label_map(self, t: int) -> np.ndarray:
        """Object ids of frame t per pixel (0 = background), DAVIS annotation style."""
        frame = self.frames[t]
        labels = np.zeros((frame.image.height, frame.image.width), dtype=np.int32)
        for inst in frame.instances:
            labels[inst.mask] = int(inst.attributes["object_id"])
        return labels


@dataclass
class MultipleChoice:
    """BLINK style: a question over several images; `answer` is "(A)", "(B)", ..."""

    id: str
    question: str
    images: list[Image.Image]
    choices: list[str]
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def answer_index(self) -> int:
        letter = self.answer.strip().strip("()").upper()
        if len(letter) != 1 or not "A" <= letter < chr(ord("A") + len(self.choices)):
            raise ValueError(f"answer {self.answer!r} is not one of the {len(self.choices)} "
                             "choices (A), (B), ...")
        return ord(letter) - ord("A")

    def prompt(self) -> str:
        """The question with lettered choices, as BLINK's `prompt` field writes it."""
        options = " ".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\nSelect from the following choices.\n{options}"
