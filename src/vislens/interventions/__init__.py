"""Composable, batched interventions on a loaded VLM (forward and generate alike)."""

from vislens.interventions.ablate import ablate
from vislens.interventions.attention_function import attach, set_inner
from vislens.interventions.capture import Captured, capture
from vislens.interventions.from_layer import residual_streams, start_at_layer
from vislens.interventions.knockout import LAST, knockout
from vislens.interventions.patch import (
    Activations,
    Attribution,
    LayoutMismatch,
    Site,
    attribution,
    logit_difference,
    patch,
    patch_continued,
    record_sites,
    restored_share,
    site_grid,
)
from vislens.interventions.reference import mean_image_embedding, mean_injected_features

__all__ = ["LAST", "Activations", "Attribution", "Captured", "LayoutMismatch", "Site", "ablate",
           "attach", "attribution", "capture", "knockout", "logit_difference",
           "mean_image_embedding", "mean_injected_features", "patch", "patch_continued",
           "record_sites",
           "residual_streams", "restored_share", "set_inner", "site_grid", "start_at_layer"]
