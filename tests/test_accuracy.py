"""Accuracy scoring: prompts come from the processor's chat template, verdicts from Question."""

import numpy as np
import pytest
import torch

from vislens.data import shapesworld
from vislens.data.samples import Question
from vislens.experiments.accuracy import evaluate, generate_answers
from vislens.models import prompting
from vislens.toy.build import build_model, build_processor


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_prompt_is_the_chat_template_plus_answer_prefix(processor):
    q = Question("vqa", "what color is the circle ?", "red", answer_prefix="it is")
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": q.prompt}]}]
    template = processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    text = prompting.render(processor, q.prompt, answer_prefix=q.answer_prefix)
    assert text == template + " it is"
    assert text.index("<image>") < text.index("what")  # image before the question
    words = processor.tokenizer.convert_ids_to_tokens(
        processor(text=[text], images=[shapesworld.make_scene(0, 0).image],
                  return_tensors="pt")["input_ids"][0])
    assert words.count("<image>") == 144
    assert words[-5:] == ["circle", "?", "<sep>", "it", "is"]


def _checksum(pixels: torch.Tensor) -> int:
    """Which scene a processed image is (questions repeat across scenes)."""
    return int(pixels.double().abs().sum().item() * 100)


class Scripted(torch.nn.Module):
    """A model whose `generate` answers from a script keyed by the prompt's last words.

    It goes through the real processor batch (left padded), so it checks that the
    prompts evaluate sends are the chat-template prompts and that answers are cut
    after the prompt before being judged.
    """

    def __init__(self, processor, answers: dict[tuple[int, str], str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok = processor.tokenizer
        self.answers = answers
        self.prompts: list[str] = []

    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, **_):
        assert pixel_values.shape[0] == input_ids.shape[0]
        assert (attention_mask[:, -1] == 1).all()  # left padding
        rows = []
        for ids, mask, pixels in zip(input_ids, attention_mask, pixel_values, strict=True):
            text = self.tok.decode(ids[mask.bool()], skip_special_tokens=False)
            self.prompts.append(text)
            question = " ".join(text.split("<image>")[-1].replace("<sep>", "").split())
            answer = self.answers.get((_checksum(pixels), question), "no")
            new = self.tok(answer, add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids.tolist() + new + [self.tok.eos_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_evaluate_judges_each_setting(processor):
    scenes = shapesworld.generate(3, seed=5)
    rng = np.random.default_rng(0)
    answers = {}
    expected = {"generative": [], "polling": [], "vqa": []}
    for setting in expected:  # the order evaluate draws questions in
        for s in scenes:
            pixels = processor.image_processor(images=[s.image], return_tensors="pt")
            scene = _checksum(pixels["pixel_values"][0])
            for q in shapesworld.questions(s, setting, rng=rng):
                key = " ".join((q.prompt + " " + q.answer_prefix).split())
                right = s.id != scenes[0].id  # every question on scene 0 answered wrong
                if setting == "generative":
                    reply = shapesworld.caption(s) if right else "a thing ."
                elif setting == "polling":
                    reply = q.answer if right else ("no" if q.answer == "yes" else "yes")
                else:
                    reply = q.answer if right else "star"
                answers[(scene, key)] = reply
                expected[setting].append(q.is_correct(reply))
    model = Scripted(processor, answers)
    result = evaluate(model, processor, scenes, batch_size=4, seed=0)
    assert result["n"] == 3
    assert result["questions"] == {"generative": 3, "polling": 6, "vqa": 6}
    for setting, verdicts in expected.items():
        assert result["accuracy"][setting] == pytest.approx(np.mean(verdicts))
    assert result["accuracy"]["polling"] == pytest.approx(4 / 6)
    for prompt in model.prompts:  # what the model got: the template's words, 144 image tokens
        words = prompt.split()
        assert words[:2] == ["<s>", "<image>"] and words.count("<image>") == 144


def test_generate_answers_on_a_real_model(processor):
    model = build_model(seed=0).eval()
    scenes = shapesworld.generate(2, seed=3)
    qs = [shapesworld.questions(s, "polling")[0] for s in scenes]
    out = generate_answers(model, processor, [s.image for s in scenes], qs, max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert processor.tokenizer.padding_side == "left"  # restored as it was


def test_evaluate_rejects_bad_input(processor):
    model = build_model(seed=0)
    with pytest.raises(ValueError, match="unknown setting"):
        evaluate(model, processor, shapesworld.generate(1), settings=("caption",))
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, processor, [])
