"""Idefics3 (`idefics3`, e.g. SmolVLM-Instruct): the image resized so its longest edge is
`size`, stretched to whole crops of `max_image_size`, split into a grid of crops plus the
whole image as a global view; SigLIP patches pixel-shuffled `scale_factor` x
`scale_factor` into one token; crops framed by row / column markers.

The LM reads, per image, each crop as <fake_token_around_image> <row_r_col_c> and its
tokens (a newline after each crop row), then <fake_token_around_image> <global-img>
and the global view's tokens, closed by <fake_token_around_image>. Markers, newlines
and <global-img> are text: they are kept apart as the image's marker tokens.
"""

from __future__ import annotations

import math

import torch

from vislens.models.families.base import Family, regroup_views
from vislens.models.families.registry import register
from vislens.models.geometry import Axis, Layout, cells, patches, size_dict


def vision_encoder_size(h: int, w: int, side: int) -> tuple[int, int]:
    """(height, width) `resize_for_vision_encoder` stretches an image to: whole multiples of
    `side` on both axes, the shorter one from the aspect ratio (the same arithmetic in the
    PIL and torchvision processors; transformers exposes it only as a method that resizes)."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / side) * side
        h = math.ceil(int(w / aspect) / side) * side
    else:
        h = math.ceil(h / side) * side
        w = math.ceil(int(h * aspect) / side) * side
    return h, w


def idefics3_layout(ip, config, image_size: tuple[int, int]) -> Layout:
    """Crops (tile 1, stitched into one grid in image order; `crop` = 1 + raster index),
    then the global view (tile 0), as the LM reads them.

    A token's box is the union of the scale_factor x scale_factor patches it merges,
    through every resize back to the original pixels; each crop's conv reads
    floor(side / patch) patches (SigLIP-384/14: 378 of 384 px), so crops leave a
    strip no token sees.
    """
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        MAX_IMAGE_SIZE,
        _resize_output_size_rescale_to_max_len,
        _resize_output_size_scale_below_upper_bound,
    )

    w, h = image_size
    vision = config.vision_config
    patch, merge = vision.patch_size, config.scale_factor
    side = size_dict(ip.max_image_size)["longest_edge"]
    if side != vision.image_size or (side // patch) % merge:
        raise ValueError(f"Idefics3 crops of {side} px for a {vision.image_size}-px vision tower "
                         f"with patch {patch} and scale factor {merge}: unsupported settings")
    n = side // patch // merge  # tokens per crop side
    cell = patch * merge
    size = size_dict(ip.size)
    h1, w1 = h, w
    if ip.do_resize:
        if size.get("longest_edge"):
            h1, w1 = _resize_output_size_rescale_to_max_len(h, w, max_len=size["longest_edge"])
            h1, w1 = _resize_output_size_scale_below_upper_bound(h1, w1, max_len=MAX_IMAGE_SIZE)
        else:
            h1, w1 = size["height"], size["width"]
    ax, ay = Axis(w1 / w), Axis(h1 / h)
    lay = Layout(image_size)
    if not ip.do_image_splitting:
        rows = cols = 0
        h2, w2 = h1, w1
    else:
        h2, w2 = vision_encoder_size(h1, w1, side)
        ax, ay = ax.then_resize(w2 / w1), ay.then_resize(h2 / h1)
        rows, cols = (h2 // side, w2 // side) if h2 > side or w2 > side else (0, 0)
    for r in range(rows):
        y = cells(*patches(n, cell, ay.then_shift(-r * side)), h)
        for c in range(cols):
            x = cells(*patches(n, cell, ax.then_shift(-c * side)), w)
            lay.add_cells(1, x, y, row0=r * n, col0=c * n, crop=1 + r * cols + c)
    if rows:
        lay.grids[1] = (rows * n, cols * n)
    gx, gy = ax.then_resize(side / w2), ay.then_resize(side / h2)
    lay.add_grid(0, cells(*patches(n, cell, gx), w), cells(*patches(n, cell, gy), h))
    return lay


@register
class Idefics3(Family):
    model_type = "idefics3"
    label = "Idefics3 / SmolVLM"
    model_class = "Idefics3ForConditionalGeneration"
    processor_class = "Idefics3Processor"
    multi_image = True
    # the connector pixel-shuffles SigLIP's raster patches before its projection: the
    # projection's input rows are the merged blocks, one per LM image token
    projector = "connector.modality_projection"
    image_open = "<fake_token_around_image>"
    image_close = "<fake_token_around_image>"

    def decoder(self, model):
        return model.model.text_model

    def layouts(self, vlm, images, inputs):
        ip = vlm.processor.image_processor
        return [[idefics3_layout(ip, vlm.config, im.size) for im in ims] for ims in images]

    def split_features(self, out, batch):
        """`get_image_features` splits its rows per sample (every crop and global view of
        the sample's images, as many views as the vision tower read): regrouped per image,
        handed back as one [views, tokens, hidden] tensor, which its forward also takes."""
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in out.pooler_output])
        views = out.last_hidden_state.shape[0]
        return regroup_views(flat.view(views, -1, flat.shape[-1]), batch, "Idefics3")

    def native_image_size(self, vlm) -> str:
        ip = vlm.processor.image_processor
        side = size_dict(ip.max_image_size)["longest_edge"]
        longest = size_dict(ip.size).get("longest_edge")
        return f"{side}x{side} crops of the image resized to {longest} px + global view"
