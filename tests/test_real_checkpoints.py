"""Every experiment, `eval` and `study` on the four look-alike checkpoints, proving each path ran.

Random weights almost never answer right, so a run on them keeps no sample and
its conditions never execute. The fixtures here (answer_head.py) are the
look-alikes with ONLY their unembedding fitted, so that greedy decoding answers
the test scenes right when the target is visible and wrong when its pixels are
noised; everything else is the random model. The scenes are 640x480 and 560x420
COCO-format images whose targets have multi-piece names ("gir|af|fe"), so the
experiments run on 576-2929-token sequences of the real geometries.
"""

from __future__ import annotations

import pytest
from answer_head import LENS_NAMES, TARGETS, answer, fitted_dir, scenes
from checkpoints import NAMES

import vislens
from vislens.experiments import logit_lens, prompts
from vislens.experiments.accuracy import generate_answers
from vislens.experiments.selection import noise_object


@pytest.fixture(scope="session", params=NAMES)
def fitted(request):
    """(name, loaded VLM) of each look-alike with its fitted unembedding."""
    return request.param, vislens.load(str(fitted_dir(request.param)))


def word_starts(tokenizer, name: str) -> set[int]:
    """The ids that begin each word of `name`, read from the tokenizer's offsets when the
    name is written in a sentence or opens the text: what a model emits for the word."""
    ids = set()
    for text, at in ((f"It is a {name}", len("It is a ")), (name, 0)):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts, pos = set(), at
        for word in name.split():
            starts.add(pos)
            pos += len(word) + 1
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if text[a:b].strip() and any(a <= s < b for s in starts):
                ids.add(int(tok))
    return ids


def test_fitted_fixtures_answer_right_clean_and_wrong_noised(fitted):
    """The construction works: eval's own generator (left-padded batches) says the target on
    every clean scene and misses it on every noised one, in all three settings."""
    name, vlm = fitted
    images, questions, expected = [], [], []
    for idx, sample in enumerate(scenes()):
        noised = noise_object(sample.image, sample.instances[0].mask, seed=idx)
        for setting in ("polling", "vqa", "generative"):
            q = prompts.question(sample, 0, setting)
            for image, is_noised in ((sample.image, False), (noised, True)):
                images.append(image)
                questions.append(q)
                expected.append((setting, is_noised, answer(sample, setting, is_noised)))
    texts = generate_answers(vlm.model, vlm.processor, images, questions,
                             max_new_tokens=prompts.MAX_NEW_TOKENS["generative"])
    for text, q, (setting, is_noised, said) in zip(texts, questions, expected, strict=True):
        assert q.is_correct(text) != is_noised, (name, setting, is_noised, text)
        assert text.strip() == said, (name, setting, text)  # and nothing after the EOS


def test_class_word_ids_are_the_pieces_a_word_starts_with(fitted):
    """The lens counts a hit when a top-k token starts a word of the class name. A
    SentencePiece tokenizer writes " giraffe" as "▁" + "▁g|ir|af|fe": the bare "▁" starts
    no word, and taking it would make every "▁" in a top-5 a hit for every class."""
    name, vlm = fitted
    for cls in (*TARGETS, *LENS_NAMES):
        got = set(logit_lens.word_ids(vlm.tokenizer, cls))
        assert got == word_starts(vlm.tokenizer, cls), (name, cls)
        for i in got:
            assert vlm.tokenizer.decode([i]).strip(), (name, cls, i)
