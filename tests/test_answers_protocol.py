"""The answer checks of Neo et al.'s three settings (data/answers.py, Question.is_correct)
against their protocol and the released code's bugs. Each test failed before its fix; the
empty-answer cases of the VQA test pin a bug of the released code vislens never had."""

from vislens.data import answers
from vislens.data.samples import Question


def test_polling_counts_yes_as_a_word():
    q = Question("polling", "", "yes")
    assert q.is_correct("Yes, there is a cat.")
    assert q.is_correct('"Yes", there is.') and q.is_correct("**Yes**")
    assert not q.is_correct("eyes")  # Neo et al.: "yes" in answer.lower()
    assert not q.is_correct("Yesterday there was.") and not q.is_correct("No, I see eyes")


def test_generative_synonyms_are_the_coco_list_and_nothing_looser():
    assert not answers.mentions("a computer keyboard on a desk", "laptop")
    assert answers.mentions("a computer keyboard on a desk", "keyboard")
    assert not answers.mentions("a bag by the door", "suitcase")
    assert not answers.mentions("a vehicle on the road", "car")
    assert not answers.mentions("a hair dryer", "hair drier")  # not in the CHAIR list
    assert answers.mentions("a laptop computer", "laptop") and answers.mentions("a macbook",
                                                                                 "laptop")
    assert answers.mentions("a baby elephant", "elephant")
    assert not answers.mentions("a baby elephant", "person")
    assert answers.mentions("a toilet seat", "toilet") and not answers.mentions("a toilet seat",
                                                                                "chair")
    assert answers.mentions("a red circle above a blue square", "red circle")  # ShapesWorld
    assert answers.SYNONYM_SOURCE.startswith("CHAIR")
    assert len(answers.synonyms()) == 80  # one line per COCO class in the shipped list


def test_vqa_answers_must_name_the_class():
    q = Question("vqa", "", "giraffe", answer_prefix="It is")
    for empty in ("", "   ", "\n", "a", "."):
        assert not q.is_correct(empty)  # Neo et al.'s startswith accepts "" (curate.py:21)
    assert not q.is_correct("gir")  # a prefix of the class is not the class
    assert q.is_correct("a giraffe.")
    assert not Question("vqa", "", "laptop").is_correct("a computer keyboard")


