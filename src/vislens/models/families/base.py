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
- and, for the experiments that map masks to tokens, its `layouts`: where every image
  token of an image comes from in the original pixels (vislens.models.geometry has the
  shared primitives that replay image processors).

A family without `layouts` still loads (models.families.generic): the experiments that
need only token positions run, those that need pixels refuse with one line.
"""

from __future__ import annotations

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
    features_tensor = False  # the model takes precomputed image features as one tensor
    # per-token inputs that appended (answer) tokens carry, beyond ids and mask (e.g.
    # PaliGemma's token_type_ids: 1 = the causal suffix); everything else continues with 0
    text_fill: dict[str, int] = {}
    image_open = ""  # token opening each image's block of tokens ("" = its first patch)
    image_close = ""  # token closing it ("" = its last patch)

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

    def layouts(self, vlm, images: list[list], inputs: dict) -> list[list[Layout]]:
        """Per sample, one Layout per image (sequence order of its image tokens)."""
        raise NotImplementedError

    def native_image_size(self, vlm) -> str:
        side = vlm.config.vision_config.image_size
        return f"{side}x{side}"
