"""Composable, batched interventions on a loaded VLM (forward and generate alike)."""

from vislens.interventions.ablate import ablate
from vislens.interventions.attention_function import attach, set_inner
from vislens.interventions.capture import Captured, capture
from vislens.interventions.from_layer import residual_streams, start_at_layer
from vislens.interventions.knockout import LAST, knockout
from vislens.interventions.reference import mean_image_embedding, mean_injected_features

__all__ = ["LAST", "Captured", "ablate", "attach", "capture", "knockout",
           "mean_image_embedding", "mean_injected_features", "residual_streams", "start_at_layer",
           "set_inner"]
