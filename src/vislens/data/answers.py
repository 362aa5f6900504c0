"""One answer checker for every command: does a model's text name the expected thing?

A real model says "two giraffes", "a motorbike" or "Yes, there is": exact
class-name matching would count those as misses and silently drop samples. A
name therefore matches in any of its surface forms: itself, its plural, and, for
COCO's 80 classes, the synonyms of the documented COCO synonym list, the one CHAIR
uses (Rohrbach et al. 2018, data/synonyms.txt of LisaAnne/Hallucination; kept as
data in `vislens/assets/coco_synonyms.txt`), each with its plural. Nothing looser:
"bag" is not a suitcase, "vehicle" not a car.

Matching is on whole words of the normalised text, read as CHAIR reads a caption:
the longest known object phrase at each place ("laptop computer", "hot dog"), and,
where two object words stand together, the first is a modifier of the second, the
head ("computer keyboard" names a keyboard, not a laptop; "baby elephant" an
elephant, not a person: CHAIR hard-codes the same for "baby/adult <animal>" and
"passenger jet/train"); CHAIR's one exception, "toilet seat", is a toilet.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

ARTICLES = ("a", "an", "the")
SYNONYM_SOURCE = ("CHAIR synonym list, Rohrbach et al. 2018 (github.com/LisaAnne/Hallucination, "
                  "data/synonyms.txt)")
# object phrases CHAIR reads as another class than their head's (its double-word rule)
COMPOUNDS = {"toilet seat": "toilet"}

IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep",
             "skis": "skis", "man": "men", "woman": "women", "child": "children",
             "scissors": "scissors", "bus": "buses", "glass": "glasses"}


@cache
def synonyms() -> dict[str, tuple[str, ...]]:
    """COCO class -> its other names, from the shipped CHAIR list (plurals come from `plural`)."""
    text = resources.files("vislens").joinpath("assets/coco_synonyms.txt").read_text("utf-8")
    table = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, *others = [w.strip() for w in line.split(",") if w.strip()]
            table[name] = tuple(others)
    return table


def plural(name: str) -> str:
    """English plural of the last word ("traffic light" -> "traffic lights")."""
    if not name.split():
        return name
    *head, last = name.split()
    if last in IRREGULAR:
        last = IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])


def surface_forms(name: str, synonyms: bool = True) -> list[str]:
    """Every way an answer may name `name`, normalised, longest first."""
    base = [normalise(name)]
    if synonyms:
        base += [normalise(s) for s in _synonyms_of(name)]
    forms = {f for b in base for f in (b, plural(b))}
    return sorted(forms, key=lambda f: (-len(f), f))


def head_words(name: str, synonyms: bool = True) -> list[str]:
    """The head (last) word of every surface form of `name`: what a single token can say
    of it ("traffic light" -> light, lights, signal, signals, stoplight, stoplights, ...;
    "hot dog" -> dog, dogs; never "traffic" or "hot")."""
    return sorted({form.split()[-1] for form in surface_forms(name, synonyms)})


def _synonyms_of(name: str) -> tuple[str, ...]:
    return synonyms().get(name.lower(), ())


@cache
def _coco_vocabulary() -> dict[tuple[str, ...], str]:
    """Every COCO surface form (as words) -> its class; the first class listed keeps a form."""
    vocab: dict[tuple[str, ...], str] = {}
    for name in synonyms():
        for form in surface_forms(name):
            vocab.setdefault(tuple(form.split()), name)
    for phrase, name in COMPOUNDS.items():
        for form in (phrase, plural(phrase)):
            vocab[tuple(form.split())] = name
    return vocab


def normalise(text: str) -> str:
    """Lower-case, punctuation split off, single spaces: how answers are compared."""
    text = re.sub(r"([.,?!:;()\"*\[\]{}])", r" \1 ", text.lower())
    return " ".join(text.split())


@cache
def _vocabulary_for(name: str, synonyms: bool) -> tuple[dict[tuple[str, ...], str], int]:
    """(the phrases `_objects` knows -> class, the longest phrase's word count) when asked
    about `name`: made once per class, since answer_span checks every prefix of an answer."""
    vocab = dict(_coco_vocabulary()) if synonyms else {}
    for form in surface_forms(name, synonyms):
        if form:
            vocab[tuple(form.split())] = name  # the asked-for name wins a shared form
    return vocab, max((len(k) for k in vocab), default=0)


def _objects(words: list[str], name: str, synonyms: bool) -> list[tuple[int, int, str]]:
    """(start, end, class) of the object phrases in `words`, longest phrase first at each
    place, each run of adjacent phrases read as one object named by its head (its last
    phrase). `name` is one of the classes (its own forms are always known, COCO's only
    with `synonyms`)."""
    vocab, longest = _vocabulary_for(name, synonyms)
    phrases, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            cls = vocab.get(tuple(words[i:i + n]))
            if cls is not None:
                phrases.append((i, i + n, cls))
                i += n
                break
        else:
            i += 1
    objects: list[tuple[int, int, str]] = []
    for start, end, cls in phrases:
        if objects and objects[-1][1] == start:  # directly after another object word
            start = objects.pop()[0]
        objects.append((start, end, cls))
    return objects


def mentions(text: str, name: str, synonyms: bool = True) -> bool:
    """The generative rule: some object phrase of the text names `name`."""
    return any(cls == name for _, _, cls in _objects(normalise(text).split(), name, synonyms))


def first_word(text: str, expected: str) -> bool:
    """The polling rule: the answer's first WORD is `expected` ("yes"; never a substring:
    "eyes" or "yesterday" is not "yes"), whatever punctuation or markup is around it."""
    words = re.findall(r"[^\W_]+", text.lower())
    return bool(words) and words[0] == expected.lower()


def starts_with(text: str, expected: str, synonyms: bool = True) -> bool:
    """The VQA rule: after an optional article, the answer's first words name `expected`
    (an empty or blank answer names nothing: Neo et al.'s `class_piece.startswith(answer)`
    is inverted and takes the empty string)."""
    words = normalise(text).split()
    if words and words[0] in ARTICLES:
        words = words[1:]
    objects = _objects(words, expected, synonyms)
    return bool(objects) and objects[0][0] == 0 and objects[0][2] == expected


# ---- when a verdict is settled ------------------------------------------------------------------
# Generation may stop once no continuation can change an answer's verdict. Each rule below
# holds for every string s appended to the text (is_correct(text + s) == is_correct(text)),
# from three facts about the checks above:
#   (a) str.lower maps each character on its own, except a capital sigma, whose small form
#       depends on what follows: with no "Σ" in the text, lower(text + s) starts with
#       lower(text);
#   (b) a punctuation character (normalise's set) always becomes a word of its own, so every
#       word before a punctuation word, and the punctuation word, are words of text + s too:
#       only the text's last word can grow into what follows;
#   (c) no object phrase holds a punctuation word (checked, `_phrases_hold_punctuation`), so
#       `_objects`' greedy scan decides each phrase starting before a punctuation word from
#       the words before it, resumes after it, and no phrase after it is adjacent to one
#       before it: objects that end at or before a punctuation word are objects of text + s.
PUNCTUATION = frozenset('.,?!:;()"*[]{}')


def _fixed_words(text: str) -> tuple[list[str], int] | None:
    """(normalised words, index of the last punctuation word), or None when no punctuation
    word (or a capital sigma) leaves anything fixed."""
    if "Σ" in text:
        return None
    words = normalise(text).split()
    marks = [i for i, w in enumerate(words) if w in PUNCTUATION]
    return (words, marks[-1]) if marks else None


@cache
def _phrases_hold_punctuation(name: str, synonyms: bool) -> bool:
    vocab, _ = _vocabulary_for(name, synonyms)
    return any(w in PUNCTUATION for phrase in vocab for w in phrase)


def first_word_settled(text: str, expected: str) -> bool:
    """Polling: the first word is complete (a character that is no letter or digit follows
    it in the lower-cased text), so `first_word` reads the same first word in every
    continuation: its regex finds the same first run of letters and digits, which nothing
    appended can reach (fact a)."""
    if "Σ" in text:
        return False
    lowered = text.lower()
    match = re.search(r"[^\W_]+", lowered)
    return match is not None and match.end() < len(lowered)


def starts_with_settled(text: str, expected: str, synonyms: bool = True) -> bool:
    """VQA: a punctuation word stands in the answer, so its first object is fixed (facts
    a-c): the first word, hence the article rule, is before or is that word, and the first
    object either ends at or before it (then it is the first object of every continuation,
    same class) or there is none before it (then any first object starts after it, never at
    the answer's start: wrong for good)."""
    fixed = _fixed_words(text)
    return fixed is not None and not _phrases_hold_punctuation(expected, synonyms)


def mentions_settled(text: str, name: str, synonyms: bool = True) -> bool:
    """Generative: an object naming `name` ends at or before a punctuation word, so it stays
    an object of every continuation (facts a-c), and the text stays correct. An object at
    the text's end is not settled ("a giraffe" + " bus" is one object named bus), and a
    wrong verdict never is: a later sentence may still name the class."""
    fixed = _fixed_words(text)
    if fixed is None or _phrases_hold_punctuation(name, synonyms):
        return False
    words, last = fixed
    return any(cls == name and end <= last for _, end, cls in _objects(words, name, synonyms))
