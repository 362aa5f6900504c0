"""The toy VLM: a real LLaVA checkpoint small enough to train and study on a laptop CPU.

`build` makes the tokenizer, processor and untrained model; `train` reproduces
the shipped weights under `vislens/assets/toy/` from scratch.
"""

from vislens.toy.build import TOY_DIR, ToySpec, build_model, build_processor, build_tokenizer

__all__ = ["TOY_DIR", "ToySpec", "build_model", "build_processor", "build_tokenizer"]
