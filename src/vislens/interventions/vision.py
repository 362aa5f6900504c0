"""The two baselines of Liu et al.: what the vision encoder hands the projector, and
what the projector hands the LM, both tied to the LM's image-token positions.

One forward hook on the projector records its input (vision features) and output
(LM-input image features). The projector output is then matched row by row to the
LM input embeddings at the image positions (exact copies for every supported family:
LLaVA-1.5 feeds the rows in order, NeXT/OneVision select and reorder tiles, Qwen2.5-VL
undoes its window order), so the same matching gives each image token its vision
feature without knowing how a family packs its tiles. Where a family changes the
projected rows (e.g. OneVision interpolating very large images) no exact match
exists and a clear error says so instead of guessing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def projector_module(vlm, path: str | None = None) -> torch.nn.Module:
    """The module whose input is the vision encoder output and whose output feeds the LM
    (where it lives is declared by the family: vislens.models.families)."""
    path = vlm.family.projector if path is None else path
    if not path:
        raise ValueError(f"no projector is declared for {vlm.model_type!r}; the vision-encoder "
                         "baseline needs a family module (vislens/models/families/)")
    module = vlm.model.model
    for part in path.split("."):
        module = getattr(module, part)
    return module


@dataclass
class ProjectorRecord:
    """Inputs and outputs of every projector call while the context was open."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    family: object = None  # whose `projector_inputs` ties input rows to output rows

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(vision rows [M, r * d_vision], projector rows [M, d_lm]), one row per output row.

        How input rows belong to an output row is the family's (Family.projector_inputs):
        a merger of r consecutive rows (Qwen's 2x2) gets those r rows concatenated, as it
        reads them; a pooling projector (Gemma 3's 4x4 average) gets the pooled rows.
        """
        if not self.outputs:
            raise ValueError("the projector never ran; capture the vision pass inside the context")
        from vislens.models.families.base import Family

        family = self.family or Family()
        ins, outs = [], []
        for x, y in zip(self.inputs, self.outputs, strict=True):
            ins.append(family.projector_inputs(x, y))
            outs.append(y.reshape(-1, y.shape[-1]))
        return torch.cat(ins), torch.cat(outs)


@contextmanager
def record_projector(vlm):
    """Record the projector's input and output on every call inside the context.

    A family whose projector merges patches itself (Mistral 3's patch merger reads
    them in raster order) names the module inside it that reads them already
    grouped, one row per output row (`projector_input`); its input is recorded
    instead.
    """
    rec = ProjectorRecord(family=vlm.family)

    def read_input(module, args):
        x = args[0] if args else None
        if x is None:
            raise ValueError("the projector was called without a positional input")
        rec.inputs.append(x.detach())

    def read_output(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        rec.outputs.append(out.detach())

    source = getattr(vlm.family, "projector_input", "")
    handles = [projector_module(vlm, source or None).register_forward_pre_hook(read_input),
               projector_module(vlm).register_forward_hook(read_output)]
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()


def match_rows(lm_input: torch.Tensor, projected: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Index into `projected` of each LM input row (they must be copies of projector rows).

    Copies are found by their exact bytes: nearest-neighbour distances cannot tell apart
    the near-identical rows of a plain background (they differ by ~1e-3 relative, the
    size of cdist's rounding on thousands of rows), and a wrong twin means a wrong
    vision feature. Only when some row has no exact copy is the nearest row measured,
    to say whether the family resamples its image features.
    """
    if len(lm_input) == 0:
        return torch.zeros(0, dtype=torch.long)
    a = lm_input.detach().float().cpu().contiguous()
    b = projected.detach().float().cpu().contiguous()
    where = {row.numpy().tobytes(): j for j, row in enumerate(b)}
    found = [where.get(row.numpy().tobytes()) for row in a]
    if all(j is not None for j in found):
        return torch.tensor(found, dtype=torch.long, device=lm_input.device)
    missing = torch.tensor([j is None for j in found])
    rows = a[missing]
    nearest = torch.cdist(rows, b).argmin(dim=1)
    err = (rows - b[nearest]).norm(dim=1) / rows.norm(dim=1).clamp_min(1e-6)
    if float(err.max()) > tol:
        raise ValueError("the LM's image inputs are not copies of projector outputs for this "
                         "model (the family resamples them); the vision-encoder baseline is "
                         "unavailable here: drop 'vision' from the sources")
    idx = torch.tensor([-1 if j is None else j for j in found], dtype=torch.long)
    idx[missing] = nearest
    return idx.to(lm_input.device)


def vision_rows(lm_input: torch.Tensor, record: ProjectorRecord) -> torch.Tensor:
    """Vision-encoder features of the image tokens whose LM input rows are `lm_input`."""
    vision, projected = record.rows()
    return vision[match_rows(lm_input, projected).to(vision.device)]
