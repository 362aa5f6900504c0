"""What vislens must know about one model family, declared in one place.

A family is a `model_type` of transformers' image-text-to-text models. Everything
else (prompting, batching, interventions, experiments) is shared, so supporting a
new family means one module here that says:

- where its text decoder (layers, final norm) and unembedding live;
- where its projector lives (the vision-encoder baseline of the perception tasks);
- how its positions are made (mRoPE families derive them from image grids and the
  attention mask, so vislens must never pass its own position ids; PaliGemma counts
  from 1);
- whether it was trained on several images per prompt;
- what its model code needs that the others do not (an attention implementation other
  than sdpa, image features as one tensor, a per-token input that generated tokens
  continue with a value of their own, a logit soft-cap);
- which text tokens frame its image tokens (row / column markers, break and end
  tokens), so that they are kept apart from both the patches and the prompt;
- whether its LM reads image features anywhere but its input embeddings (Qwen3-VL's
  DeepStack adds per-layer features at the image positions of its first layers, which
  an ablation must replace too), and how the vision pass's output is split per image
  and handed back to the model;
- and, for the experiments that map masks to tokens, its `layouts`: where every image
  token of an image comes from in the original pixels (vislens.models.geometry has the
  shared primitives that replay image processors).

A family without `layouts` still loads (models.families.generic): the experiments that
need only token positions run, those that need pixels refuse with one line.
"""

from __future__ import annotations

from vislens.models.embeddings import ImageEmbeddings
from vislens.models.geometry import Layout


class Family:
    model_type = ""
    label = ""  # how a researcher names it
    model_class = ""  # transformers class; "" = AutoModelForImageTextToText
    processor_class = ""  # transformers processor class (for the torchvision-free fallback)
    mrope = False  # positions come from image grids and the attention mask
    multi_image = False  # trained on several images per prompt
    video_processor = False  # its processor insists on a (torchvision) video processor
    torchvision_processor = False  # its processor's module imports torchvision itself
    tokenizer_kwargs: dict = {}  # passed when loading its tokenizer (and processor)
    projector = "multi_modal_projector"  # attribute path under model.model
    # where the vision rows the projector reads are taken from, when not its own input
    # (a projector that merges patches itself reads them in another order)
    projector_input = ""
    geometric = True  # has `layouts`
    position_offset = 0  # first real token's position (PaliGemma counts from 1)
    # per-token inputs that appended (answer) tokens carry, beyond ids and mask (e.g.
    # PaliGemma's token_type_ids: 1 = the causal suffix); everything else continues with 0
    text_fill: dict[str, int] = {}
    image_open = ""  # token opening each image's block of tokens ("" = its first patch)
    image_close = ""  # token closing it ("" = its last patch)
    deepstack = False  # the LM adds per-layer image features after its first layers

    def configure(self, processor) -> None:
        """Adjust a loaded processor so that it does what its saved settings say."""

    def split_features(self, out, batch):
        """`get_image_features` output as ImageEmbeddings (one entry per
        image, sequence order)."""
        return ImageEmbeddings([f.detach() for f in out.pooler_output])

    def projector_inputs(self, x, y):
        """The projector's input rows behind each of its output rows: [M, r * d_in] for y's
        M rows. Default: r consecutive input rows per output row (Qwen's 2x2 merger reads
        its merge windows as consecutive rows; LLaVA projectors map row to row)."""
        y = y.reshape(-1, y.shape[-1])
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] % y.shape[0]:
            raise ValueError(f"projector maps {x.shape[0]} rows to {y.shape[0]}; "
                             "cannot tie its inputs to its outputs")
        return x.reshape(y.shape[0], -1)

    def decoder(self, model):
        """The text decoder: embeddings, `layers`, final `norm` (no LM head)."""
        return model.model.language_model

    def lm_head(self, model):
        return model.lm_head

    def attn_implementation(self, config: dict) -> str:
        """The attention the model is loaded with, from its config.json (vislens wraps the
        LM's; sdpa unless the LM cannot run it)."""
        return "sdpa"

    def processor_type(self) -> type:
        """The processor class, for building it from its parts when AutoProcessor cannot."""
        import transformers

        return getattr(transformers, self.processor_class)

    def logit_softcap(self, config) -> float | None:
        """Final-logit soft-cap (cap * tanh(logits / cap)) the model applies after its head."""
        return None

    def image_token_id(self, config) -> int:
        value = getattr(config, "image_token_id", None)
        if value is None:
            value = getattr(config, "image_token_index", None)
        if value is None:
            raise ValueError(f"{self.model_type} config has no image_token_id; vislens needs "
                             "the image tokens in the language model's sequence")
        return int(value)

    def require_layout(self, what: str) -> None:
        """Refuse, before any work, an experiment that maps pixels to tokens on a family
        without a layout (the generic fallback)."""
        if not self.geometric:
            from vislens.models.tokenmap import no_layout

            raise no_layout(self.model_type, what)

    def layouts(self, vlm, images: list[list], inputs: dict) -> list[list[Layout]]:
        """Per sample, one Layout per image (sequence order of its image tokens)."""
        raise NotImplementedError

    def native_image_size(self, vlm) -> str:
        side = vlm.config.vision_config.image_size
        return f"{side}x{side}"


def regroup_views(views, batch, label: str):
    """Features a model returns as ONE [views, tokens_per_view, hidden] tensor (Gemma 3 and
    its like) as ImageEmbeddings: rows regrouped per image, as many as the image has tokens
    in the sequence, and handed back to the model in the same one-tensor form."""
    import numpy as np

    views = views.detach()
    tm = batch.token_map
    counts = []
    for b in range(batch.size):
        n_images = len(tm.all_image_sizes[b])
        counts += np.bincount(tm.image[tm.batch == b], minlength=n_images).tolist()
    flat = views.reshape(-1, views.shape[-1])
    if sum(counts) != flat.shape[0]:
        raise ValueError(f"{label} vision pass gave {flat.shape[0]} token features for "
                         f"{sum(counts)} image tokens")
    return ImageEmbeddings(list(flat.split(counts)), tokens_per_view=views.shape[1])
