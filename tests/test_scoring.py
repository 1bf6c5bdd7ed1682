"""Tests of jax_it/scoring.py: the three answer readings, regressions, loops, text metrics."""

import pytest

from jax_it import scoring


@pytest.mark.parametrize("response, readings", [
    ("44", (True, True, True)),
    ("  44\n", (True, True, True)),
    ("44.\nAnd then more text", (False, True, True)),
    ("2 * 22 = 44\n\n### Input: ...", (False, False, True)),
    ("448", (False, False, False)),
    ("", (False, False, False)),
])
def test_readings_strictest_first(response, readings):
  assert tuple(scoring.MATCHES[r]("44", response) for r in scoring.READINGS) == readings


def test_lenient_readings_normalize_case_spaces_and_punctuation():
  assert scoring.first_line("HOUSE, CAT, BOOK", "house cat  book!\nmore")
  assert scoring.contains("New York", "I think it is new-york, yes")
  assert not scoring.contains("cat", "category")


def test_answer_metrics_by_hand():
  answers = ["4", "cat", "7", "red"]
  base = ["2 + 2 = 4 and more", "cat", "no idea", "Red."]
  tuned = ["4", "dog", "7", "red"]
  m = scoring.answer_metrics(answers, base, tuned, groups=["add", "word", "add", "word"])
  assert (m["strict_base"], m["first_line_base"], m["contains_base"]) == (0.25, 0.5, 0.75)
  assert m["strict_tuned"] == 0.75 and m["regressions"] == 1  # "cat": base had it, tuned not
  assert m["per_group"]["word"]["regressions"] == 1 and m["per_group"]["add"]["n"] == 2
  with pytest.raises(ValueError, match="3 tuned"):
    scoring.answer_metrics(answers, base, tuned[:3])


@pytest.mark.parametrize("text, loop", [
    ("right\nRight\nRight\n" * 4, True),
    ("a b c d " * 3 + "a b", True),  # the last repeat cut short by the token limit
    ("The answer is 4. Two and two make four, and four is the answer.", False),
    ("very very very good", False),  # three repeats, but too short to call a loop
    ("", False),
])
def test_repetition_loop(text, loop):
  assert scoring.repetition_loop(text) == loop


def test_text_metrics():
  refs = ["Paris is the capital of France.", "Two."]
  resp = ["Paris is the capital of France.", "ha " * 30]
  m = scoring.text_metrics(refs, resp, [True, False])
  assert (m["n"], m["stopped"], m["loops"]) == (2, 0.5, 0.5)
  assert m["within_3x_reference"] == 1.0  # 90 chars <= 3 * 4 + 200
  assert m["rouge_l"] == pytest.approx(0.5)
  assert "rouge_l" not in scoring.text_metrics(None, resp, [True, True])
