"""nnsight and TransformerLens wrappers of the same weights, built offline.

Each rival gets its own deep copy of the model, made before vislens attaches
to it: TransformerLens rewires the model it is given (bridges, eager
attention), and neither should see vislens' attention function.
"""

from __future__ import annotations

import copy


def nnsight_model(hf_model):
    from nnsight import NNsight

    return NNsight(copy.deepcopy(hf_model))


def transformer_lens_bridge(hf_model, tokenizer):
    """A TransformerBridge (TransformerLens 4.x) around a copy of the model.

    TransformerLens' boot tries to load the model's processor from the hub by
    name and, for multimodal models, runs `pip install torchvision` when that
    fails (which replaces the installed torch). Both are switched off here:
    the bridge is only given token ids and pixel values.
    """
    import transformer_lens.model_bridge.sources.transformers.helpers as tl_helpers
    import transformer_lens.model_bridge.sources.transformers.source as tl_source
    from transformer_lens.model_bridge import TransformerBridge

    tl_source.load_modality_processor = lambda *args, **kwargs: None
    tl_helpers._ensure_torchvision = lambda: False
    model = copy.deepcopy(hf_model)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    tok = copy.deepcopy(tokenizer)
    tok.init_kwargs.update(name_or_path="local", add_bos_token=True)
    return TransformerBridge.boot_transformers("local", hf_model=model, tokenizer=tok)
