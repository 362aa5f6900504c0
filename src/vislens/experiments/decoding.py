"""Greedy decoding over continued rows (vislens.interventions.continuation) that stops each
row once its answer's verdict can no longer change.

`vlm.generate` decodes every row for max_new_tokens (or to its EOS) and keeps finished rows
in the batch. Here a row also leaves as soon as `Question.settled` says its text's verdict
holds for every continuation, and finished rows leave the batch (`Rows.select`), so the
LM runs only the rows still undecided. Where a row stops for that reason its text is
shorter than generate's, with the same verdict.

Two conditions make it generate's twin, checked by `plain_greedy` (else callers use
generate): the generation config adds nothing to argmax (no repetition penalty, banned or
forced tokens, minimum length, beams, ...), and generate stops on known EOS ids (the
generation config's: what generate stops on; vlm.stop_ids also holds the pad id, which
generate would decode past).

The settled rules are proved on texts: text + s has the verdict of text for every s. A
generation's text is that of its first tokens plus more only where decoding is prefix
stable, so `stable_text` keeps the part of the decoded text no later token can change:
a trailing U+FFFD (an incomplete UTF-8 sequence that later bytes complete) is dropped,
and where the tokenizer cleans up tokenization spaces (" n't" -> "n't", " ." -> "."),
which deletes a space that may belong to a pattern only the next tokens complete, the
text is cut before its last whitespace: every pattern starts with a space and holds no
other space but " ' "'s last character, so a deletion the next tokens cause starts at or
after the last whitespace the text still has, and the text before it is a prefix of every
continuation's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vislens.interventions.continuation import Rows, advance, embed

# generation-config settings that change which token greedy decoding picks, with the value
# that leaves argmax alone
_NEUTRAL = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
            "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
            "bad_words_ids": (None,), "suppress_tokens": (None,),
            "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
            "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
            "num_beams": (None, 1), "guidance_scale": (None, 1.0), "stop_strings": (None,),
            "watermarking_config": (None,), "forced_decoder_ids": (None,)}


def generation_stops(vlm) -> set[int]:
    """The ids `generate` ends a row on (the generation config's EOS)."""
    eos = getattr(getattr(vlm.model, "generation_config", None), "eos_token_id", None)
    ids = eos if isinstance(eos, list | tuple) else [eos]
    return {int(i) for i in ids if i is not None}


def plain_greedy(vlm) -> str:
    """Why `greedy` would not be vlm.generate's twin on this model ("" = it is)."""
    config = getattr(vlm.model, "generation_config", None)
    if config is None:
        return "the model has no generation config"
    changed = sorted(k for k, ok in _NEUTRAL.items() if getattr(config, k, None) not in ok)
    if changed:
        return f"its generation config changes greedy decoding ({', '.join(changed)})"
    if not generation_stops(vlm):
        return "its generation config names no EOS"
    return ""


def stable_text(tokenizer, text: str) -> str:
    """The part of a decoded prefix that every longer generation's text starts with (see the
    module docstring)."""
    text = text.rstrip("\ufffd")
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        cut = max((i for i, c in enumerate(text) if c.isspace()), default=0)
        text = text[:cut]
    return text


def decode_ids(vlm, ids: list[int]) -> str:
    """One row's text as vlm.decode gives it (special tokens skipped)."""
    return vlm.tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def greedy(vlm, rows: Rows, logits: torch.Tensor, max_new: int,
           settled: Callable[[str], bool] | None = None) -> list[list[int]]:
    """Greedy continuation of `rows` from `logits` [n, vocab] (their last position's): per
    row, the new token ids, without the EOS that ended it. A row ends at an EOS, after
    max_new tokens, or once `settled(text so far)`; ended rows leave the batch."""
    stops = generation_stops(vlm)
    out: list[list[int]] = [[] for _ in range(rows.size)]
    live = list(range(rows.size))
    while live:
        nxt = logits.argmax(-1)
        stay = []
        for j, i in enumerate(live):
            token = int(nxt[j])
            if token in stops:
                continue
            out[i].append(token)
            if len(out[i]) >= max_new:
                continue
            if settled is not None and settled(stable_text(vlm.tokenizer,
                                                           decode_ids(vlm, out[i]))):
                continue
            stay.append(j)
        if not stay:
            break
        if len(stay) < len(live):
            rows = rows.select(stay)
            nxt = nxt[torch.as_tensor(stay, device=nxt.device)]
            live = [live[j] for j in stay]
        logits = advance(vlm, rows, embed(vlm, nxt[:, None]))[:, -1]
    return out
