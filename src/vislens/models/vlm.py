"""VLM: one unmodified transformers model + processor, and the geometry of its image tokens.

What differs between families (where the decoder lives, how positions are made,
where image tokens come from in the image) is declared in vislens.models.families;
everything here (prompting, batching, running) is shared.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vislens.models import geometry, prompting
from vislens.models.embeddings import ImageEmbeddings
from vislens.models.families import Family, family_for
from vislens.models.loading import detect_family, load_model, load_processor, resolve
from vislens.models.tokenmap import ImageTokenMap

PIXEL_KEYS = ("pixel_values",)


@dataclass
class Batch:
    """Model inputs of a left-padded batch plus where its image tokens come from."""

    inputs: dict[str, torch.Tensor]
    token_map: ImageTokenMap
    texts: list[str]
    features: ImageEmbeddings | None = None  # cached by VLM.image_embeddings
    family: Family | None = None  # what its appended (answer) tokens carry

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return self.size

    def model_inputs(self, image_features: list[torch.Tensor] | None = None) -> dict:
        """Keyword arguments for the model; precomputed features replace the vision pass."""
        if image_features is None:
            image_features = self.features
        if image_features is None:
            return dict(self.inputs)
        if not isinstance(image_features, ImageEmbeddings):
            image_features = ImageEmbeddings(image_features)
        kwargs = {k: v for k, v in self.inputs.items() if k not in PIXEL_KEYS}
        kwargs["mm_encoder_outputs"] = {"image": image_features.encoder_output()}
        return kwargs


class VLM:
    """A loaded vision-language model. Interventions (vislens.interventions) act on it."""

    def __init__(self, model, processor, family: str | Family, name: str = "") -> None:
        self.model = model
        self.processor = processor
        # family: the registered Family object (image layout, projector, decoder paths);
        # model_type: its Hugging Face config string ("llava", "qwen2_5_vl", ...)
        self.family = family if isinstance(family, Family) else family_for(family)
        self.model_type = self.family.model_type
        self.name = name or str(getattr(model.config, "_name_or_path", ""))
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token_id = self.family.image_token_id(model.config)
        self.family.configure(processor)

    # ---- structure -------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first module that runs,
        also when accelerate spreads the model over several devices)."""
        weight = self.model.get_input_embeddings().weight
        if weight.device.type != "meta":
            return weight.device
        hooked = getattr(self.model.get_input_embeddings(), "_hf_hook", None)
        return torch.device(getattr(hooked, "execution_device", None) or "cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder (embeddings, layers, final norm), without the LM head."""
        return self.family.decoder(self.model)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> torch.nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.family.lm_head(self.model)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of residual-stream vectors: final norm applied once, then the LM head (and
        the family's logit soft-cap, so they are the model's own logits)."""
        logits = self.lm_head(self.final_norm(hidden))
        cap = self.family.logit_softcap(self.config)
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def require_layout(self, what: str) -> None:
        self.family.require_layout(what)

    def native_image_size(self) -> str:
        """The size the vision tower works at: fixed, or the range a dynamic one accepts."""
        return self.family.native_image_size(self)

    # ---- inputs ----------------------------------------------------------------------------
    def chat_text(self, prompt: str, answer_prefix: str | None = None,
                  prefix: str | None = None, n_images: int = 1) -> str:
        """The rendered chat text of one sample (see vislens.models.prompting)."""
        return prompting.render(self.processor, prompt, n_images=n_images, prefix=prefix,
                                answer_prefix=answer_prefix)

    def prepare(self, images, prompts, answer_prefixes=None, prefixes=None) -> Batch:
        """Tokenise one image + prompt per sample (left padded) and map its image tokens.

        images: one image per sample, or a list of images for a sample that shows
        several in one prompt (families that read several images, e.g. OneVision and
        Qwen2.5-VL; the token map's `image` column says which one a token is of).
        prefixes: optional text per sample placed BEFORE the image tokens (checked
        on the token ids, whatever order the chat template writes).
        """
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(prompts, str):
            prompts = [prompts]
        images = [[im.convert("RGB") for im in (x if isinstance(x, list | tuple) else [x])]
                  for x in images]
        n = len(prompts)
        if len(images) != n:
            raise ValueError(f"got {len(images)} images for {n} prompts; give one each")
        if any(not ims for ims in images):
            raise ValueError("every sample needs at least one image")
        answer_prefixes = _per_sample(answer_prefixes, n, "answer_prefixes")
        prefixes = _per_sample(prefixes, n, "prefixes")
        texts = [self.chat_text(p, a, x, n_images=len(ims))
                 for p, a, x, ims in zip(prompts, answer_prefixes, prefixes, images, strict=True)]
        inputs = prompting.encode(self.processor, images, texts)
        layouts = self._layouts(images, inputs)
        ids = inputs["input_ids"].numpy()
        positions = [np.flatnonzero(row == self.image_token_id) for row in ids]
        for b, prefix in enumerate(prefixes):
            if prefix:
                mask = inputs["attention_mask"][b].numpy()
                self._check_prefix(texts[b], prefix, ids[b][mask > 0], positions[b] - int(
                    (mask == 0).sum()))
        markers = [self._markers(ids[b], positions[b], [len(lay) for lay in layouts[b]])
                   for b in range(n)]
        token_map = ImageTokenMap.build(layouts, positions, family=self.model_type, markers=markers)
        for key, value in inputs.items():
            value = value.to(self.device)
            if value.is_floating_point():
                value = value.to(self.dtype)
            inputs[key] = value
        return Batch(inputs=inputs, token_map=token_map, texts=texts, family=self.family)

    def _markers(self, ids: np.ndarray, image_cols: np.ndarray, per_image: list[int]
                 ) -> list[np.ndarray]:
        """Per image, the columns of the text tokens inside its block of image tokens.

        A block runs from the family's opening token before the image's first image
        token (or that token) to its closing token after the last one; row / column
        markers, break tokens and the newlines between crop rows lie in between. They
        are tokens of the prompt's own vocabulary, not patches.
        """
        opening, closing = (self.tokenizer.convert_tokens_to_ids(t) if t else None
                            for t in (self.family.image_open, self.family.image_close))
        out, start, floor = [], 0, 0
        for count in per_image:
            cols = image_cols[start:start + count]
            start += count
            if not len(cols):
                out.append(np.zeros(0, dtype=np.int64))
                continue
            first, last = int(cols[0]), int(cols[-1])
            if opening is not None:
                before = np.flatnonzero(ids[floor:first] == opening)
                first = floor + int(before[-1]) if len(before) else first
            if closing is not None and last + 1 < len(ids) and ids[last + 1] == closing:
                last += 1
            span = np.arange(first, last + 1)
            out.append(span[~np.isin(span, cols)])
            floor = last + 1
        return out

    def _check_prefix(self, text: str, prefix: str, ids: np.ndarray, image_cols: np.ndarray
                      ) -> None:
        """The prefix's tokens must come before the first image token, on the ids themselves.

        ids / image_cols are of the unpadded sequence: the text before the image
        placeholder, tokenised on its own, must be exactly its first ids.
        """
        first = text.find(prompting.image_placeholder(self.processor))
        at = text.find(prefix)
        before = self.tokenizer(text[:first], add_special_tokens=prompting.adds_special_tokens(
            self.tokenizer, text))["input_ids"]
        if not 0 <= at < first or ids[:len(before)].tolist() != list(before) \
                or len(before) > image_cols[0]:
            raise ValueError("the text prefix does not precede the image tokens in the input ids; "
                             "this model's template or processor moved it")

    def _layouts(self, images: list[list[Image.Image]], inputs: dict
                 ) -> list[list[geometry.Layout]]:
        """Per sample, one layout per image, in sequence order (the family's own)."""
        return self.family.layouts(self, images, inputs)

    # ---- running ---------------------------------------------------------------------------
    @torch.no_grad()
    def image_embeddings(self, batch: Batch) -> ImageEmbeddings:
        """Post-projector features per image, in LM sequence order (newline slots included).

        They are cached on the batch, and every later `forward` / `generate` of
        that batch reuses them: one vision pass per image whatever the number
        of conditions that only change the LM's inputs or attention. What else
        the family's LM reads from the vision pass (Qwen3-VL's DeepStack
        features) travels with them (see ImageEmbeddings).
        """
        if batch.features is not None:
            return batch.features
        fn = self.model.model.get_image_features
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in batch.inputs.items()
                  if k in params and k not in ("input_ids", "attention_mask")}
        out = fn(**kwargs, return_dict=True)
        batch.features = self.family.split_features(out, batch)
        return batch.features

    def forward(self, batch: Batch, image_features: list[torch.Tensor] | None = None,
                grad: bool = False, **kwargs):
        """One forward pass of the whole model (logits for every position unless limited).

        Positions are counted from each row's first real token, as `generate` counts
        them, so a left-padded row computes exactly what it computes alone (RoPE
        keys included), starting where the family starts (PaliGemma: 1). mRoPE
        families derive their positions from the mask themselves.
        """
        self._check_features(image_features)
        inputs = batch.model_inputs(image_features)
        if "position_ids" not in kwargs and not self.family.mrope:
            mask = batch.attention_mask.long()
            offset = self.family.position_offset
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0) + offset
        with torch.set_grad_enabled(grad):
            return self.model(**inputs, use_cache=False, **kwargs)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 20,
                 image_features: list[torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        """Greedy continuation; returns only the new tokens [batch, new]."""
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        self._check_features(image_features)
        out = self.model.generate(**batch.model_inputs(image_features),
                                  max_new_tokens=max_new_tokens, **kwargs)
        return out[:, batch.seq_len:]

    def _check_features(self, image_features) -> None:
        """Features without their injected parts would run a DeepStack model on half its image."""
        if image_features is not None and self.family.deepstack and \
                getattr(image_features, "injected", None) is None:
            raise ValueError(f"{self.family.label} also injects per-layer visual features into its "
                             "first decoder layers; pass the features vlm.image_embeddings "
                             "returned (they carry those), not a plain list")

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a generation (EOS of the tokenizer and generation config, pad)."""
        ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(eos if isinstance(eos, list | tuple) else [eos])
        return {int(i) for i in ids if i is not None}

    def trim(self, tokens: torch.Tensor) -> list[int]:
        """One row of generated ids up to (not including) the first stop id."""
        out = []
        stop = self.stop_ids
        for t in tokens.tolist():
            if t in stop:
                break
            out.append(int(t))
        return out


def _per_sample(values, n: int, name: str) -> list:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} must have one entry per prompt (None for none)")
    return values


def load(model: str | Path = "toy", device: str | torch.device = "cpu",
         dtype: torch.dtype | str | None = None, device_map: str | dict | None = None,
         max_memory: str | dict | None = None, offload_folder: str | Path | None = None) -> VLM:
    """Load "toy", "toy-qwen" or a local Hugging Face directory (family read from config.json).

    device_map ("auto", "balanced", or {module: device}) spreads a model too large for one
    GPU over several GPUs, the CPU and disk with accelerate; every intervention works
    across devices (each hook moves what it adds to the device of the tensor it meets).
    """
    path = resolve(model)
    family = detect_family(path)
    processor = load_processor(path, family)
    hf_model = load_model(path, family, device=device, dtype=dtype, device_map=device_map,
                          max_memory=max_memory, offload_folder=offload_folder)
    return VLM(hf_model, processor, family, name=str(model))
