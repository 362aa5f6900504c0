"""Samples, the embedded ShapesWorld data set, and loaders for native data formats."""

from vislens.data.resolve import TASKS, open_dataset, open_task
from vislens.data.samples import (
    CorrespondencePair,
    CoSegmentationSet,
    FewShotEpisode,
    Instance,
    MultipleChoice,
    Question,
    ReferringExpression,
    Sample,
    SemanticMap,
    Video,
)

__all__ = [
    "TASKS", "CoSegmentationSet", "CorrespondencePair", "FewShotEpisode", "Instance",
    "MultipleChoice", "Question", "ReferringExpression", "Sample", "SemanticMap", "Video",
    "open_dataset", "open_task",
]
