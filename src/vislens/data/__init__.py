"""Samples, the embedded ShapesWorld data set, and loaders for native data formats."""

from vislens.data.resolve import open_dataset
from vislens.data.samples import Instance, Question, Sample

__all__ = ["Instance", "Question", "Sample", "open_dataset"]
