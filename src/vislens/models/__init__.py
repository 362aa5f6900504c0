"""Loading VLMs and mapping their image tokens to pixels."""

from vislens.models.families import FAMILIES, SUPPORTED
from vislens.models.tokenmap import ImageTokenMap
from vislens.models.vlm import VLM, Batch, load

__all__ = ["FAMILIES", "SUPPORTED", "Batch", "ImageTokenMap", "VLM", "load"]
