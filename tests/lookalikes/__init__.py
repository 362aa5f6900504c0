"""Offline look-alikes of real VLM checkpoints: the registry.

vislens has to work on real checkpoints (the seed papers' four and every family it
supports), but tests cannot download them. Each look-alike directory matches its
checkpoint in every file a loader reads (hub-layout config.json, image processor,
processor, tokenizer of the same kind with the real special-token ids, chat template with
the real quirks, generation config) except the weights: the language model and the vision
tower are shrunk in depth and width and randomly initialised (seeded). Vocabulary sizes
stay real, so token ids, embedding rows and logit widths are those of the real model. The
paper four's facts come from docs/sources/real-checkpoints.md; values a source could not
confirm are marked UNVERIFIED where they are chosen.

One module per family builds its look-alike (`NAME`, `FAMILY` = the config's model_type,
`tokenizer_files()`, `model_config()`, ..., `build(out)`); common.py holds what they share
(the tokenizer trainers and their corpus, the shrunk sizes, the writer). This module is
the registry: NAMES, the name constants, `FAMILY`, `build(name, out)`,
`fingerprint(name)` and `checkpoint_dir(name)`.

`checkpoint_dir(name)` (a Path that `vislens.load(str(path))` reads; the session fixture
`checkpoint` in conftest.py yields (name, path) for each of PAPER) caches each directory
under $VISLENS_FIXTURE_CACHE (default ~/.cache/vislens/fixtures) as `<name>-<fingerprint>`
and publishes it with one atomic rename, so concurrent or interrupted sessions never see
half a checkpoint. Older keys are not pruned. Building one takes a few seconds and writes tens
of MB (the real vocabularies dominate).

The fingerprint of a family is a hash of its module's source, of every module of this
package it imports (transitively: common.py for all of them, qwen2_5_vl.py for Qwen2-VL's
template, qwen2_vl.py for Qwen3-VL's tokenizer) and of the transformers / tokenizers /
torch versions. Editing one family's module therefore rebuilds that family only (and the
families that import from it); editing common.py rebuilds all. This file is not hashed:
it decides where a directory is cached, never what is in it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from . import (
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    mistral3,
    paligemma,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
)

# the seed papers' four
LLAVA15 = llava.NAME  # llava-1.5-7b-hf
NEXT = llava_next.NAME  # llama3-llava-next-8b-hf
ONEVISION = llava_onevision.NAME  # llava-onevision-qwen2-7b-ov-hf
QWEN25VL = qwen2_5_vl.NAME  # Qwen2.5-VL-7B-Instruct
# the families vislens supports beyond them
QWEN2VL = qwen2_vl.NAME  # Qwen2-VL-7B-Instruct
QWEN3VL = qwen3_vl.NAME  # Qwen3-VL-8B-Instruct
GEMMA3 = gemma3.NAME  # gemma-3-4b-it
SMOLVLM = idefics3.NAME  # SmolVLM-Instruct
INTERNVL = internvl.NAME  # InternVL3-8B-hf
MISTRAL3 = mistral3.NAME  # Mistral-Small-3.1-24B-Instruct-2503
PALIGEMMA = paligemma.NAME  # paligemma2-3b-mix-224

MODULES = {m.NAME: m for m in (llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl,
                                qwen3_vl, gemma3, idefics3, internvl, mistral3, paligemma)}
PAPER = (LLAVA15, NEXT, ONEVISION, QWEN25VL)
NAMES = tuple(MODULES)  # every look-alike, the paper four first
FAMILY = {name: m.FAMILY for name, m in MODULES.items()}  # name -> the config's model_type


def module(name: str):
    """The module that builds look-alike `name`."""
    try:
        return MODULES[name]
    except KeyError:
        raise ValueError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}") \
            from None


def build(name: str, out: Path) -> Path:
    """Write the look-alike of `name` into the (empty or new) directory `out`."""
    return module(name).build(Path(out))


def tokenizer_files(name: str) -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) of look-alike `name`."""
    return module(name).tokenizer_files()


def sources(name: str) -> list[Path]:
    """The files of this package that decide what look-alike `name` holds: its module and,
    transitively, every module of the package it imports (`from .x import ...`)."""
    here = Path(__file__).parent
    todo, seen = [module(name).__name__.rsplit(".", 1)[-1]], set()
    while todo:
        stem = todo.pop()
        if stem in seen:
            continue
        seen.add(stem)
        tree = ast.parse((here / f"{stem}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    todo.append(node.module)
                else:
                    todo.extend(a.name for a in node.names)
    return [here / f"{stem}.py" for stem in sorted(seen)]


def fingerprint(name: str) -> str:
    """Changes with the sources of look-alike `name` (`sources`) and with every library
    whose behaviour shapes the files."""
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256()
    for path in sources(name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for version in (transformers.__version__, tokenizers.__version__, torch.__version__):
        digest.update(version.encode())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("VISLENS_FIXTURE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vislens" / "fixtures"


def checkpoint_dir(name: str) -> Path:
    """The cached look-alike of `name`, built first if this source/version has none yet."""
    module(name)  # unknown names fail here, before anything is built
    return publish(cache_root() / f"{name}-{fingerprint(name)}", lambda tmp: build(name, tmp))


def publish(target: Path, make) -> Path:
    """`target`, made by `make(directory)` in a temporary sibling first when it does not
    exist, then published with one atomic rename (a concurrent or interrupted session never
    sees half of it; whoever renames first wins)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not "someone else published it first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

