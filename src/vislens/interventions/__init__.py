"""Composable, batched interventions on a loaded VLM (forward and generate alike)."""

from vislens.interventions.ablate import ablate
from vislens.interventions.capture import Captured, capture
from vislens.interventions.hub import attach, set_inner
from vislens.interventions.knockout import LAST, knockout
from vislens.interventions.reference import mean_image_embedding, mean_injected_features
from vislens.interventions.resume import residual_streams, resume

__all__ = ["LAST", "Captured", "ablate", "attach", "capture", "knockout",
           "mean_image_embedding", "mean_injected_features", "residual_streams", "resume",
           "set_inner"]
