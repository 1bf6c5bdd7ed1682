"""Reading responses: exact and lenient answer matches, repetition loops, ROUGE-L.

A skeptic's readings of a short answer, strictest first:
  strict      the response, stripped, is the answer;
  first_line  its first non-empty line is the answer once case, spaces and punctuation are
              normalized (the answer said first, then rambling);
  contains    the normalized answer appears in the normalized response as whole words (the
              answer somewhere in the rambling; the base model's best reading).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence

_PUNCT = re.compile(r"[^\w\s]|_")
READINGS = ("strict", "first_line", "contains")


def normalize(text: str) -> str:
  """Lowercase, punctuation to spaces, runs of whitespace to one space."""
  return " ".join(_PUNCT.sub(" ", text.lower()).split())


def strict(answer: str, response: str) -> bool:
  return response.strip() == answer.strip()


def first_line(answer: str, response: str) -> bool:
  lines = [line for line in response.splitlines() if line.strip()]
  return bool(lines) and normalize(lines[0]) == normalize(answer)


def contains(answer: str, response: str) -> bool:
  a = normalize(answer)
  return bool(a) and f" {a} " in f" {normalize(response)} "


MATCHES: dict[str, Callable[[str, str], bool]] = {
    "strict": strict, "first_line": first_line, "contains": contains}


def answer_metrics(answers: Sequence[str], base: Sequence[str], tuned: Sequence[str],
                   groups: Sequence[str] | None = None) -> dict:
  """Each reading's accuracy for base and tuned, and regressions: answers the base gave by its
  most lenient reading (contains) that the tuned model gets wrong (strict); overall and per group
  (task family) when `groups` is given."""
  if not len(answers) == len(base) == len(tuned):
    raise ValueError(f"{len(answers)} answers, {len(base)} base and {len(tuned)} tuned responses")
  groups = list(groups) if groups is not None else [None] * len(answers)

  def one(idx: list[int]) -> dict:
    out = {"n": len(idx)}
    for name, match in MATCHES.items():
      for model, texts in (("base", base), ("tuned", tuned)):
        out[f"{name}_{model}"] = sum(match(answers[i], texts[i]) for i in idx) / max(len(idx), 1)
    out["regressions"] = sum(contains(answers[i], base[i]) and not strict(answers[i], tuned[i])
                             for i in idx)
    return out

  result = one(list(range(len(answers))))
  if any(g is not None for g in groups):
    result["per_group"] = {g: one([i for i, h in enumerate(groups) if h == g])
                           for g in sorted(set(groups))}
  return result


def repetition_loop(text: str, min_words: int = 10, max_period: int = 25) -> bool:
  """Whether the text ends in a loop: its last words repeat one n-gram (n <= max_period) at
  least three times in a row up to the end (the last repeat may be cut short by the token
  limit), over at least `min_words` words."""
  words = text.split()
  for p in range(1, min(max_period, len(words) // 3) + 1):
    run = 0  # how many trailing words equal the word p before them
    while run < len(words) - p and words[-1 - run] == words[-1 - run - p]:
      run += 1
    if run >= 2 * p and run + p >= min_words:
      return True
  return False


def rouge_l(references: Sequence[str], responses: Sequence[str]) -> list[float]:
  """ROUGE-L F1 of each response against its reference (rouge-score, Porter stemming)."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top

  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  return [scorer.score(ref, resp)["rougeL"].fmeasure for ref, resp in zip(references, responses)]


def text_metrics(references: Sequence[str] | None, responses: Sequence[str],
                 stopped: Sequence[bool]) -> dict:
  """Open-ended responses: share ending with a stop token, median length in characters, share
  in a repetition loop; with references also their median length, the share within 3x the
  reference's length + 200 characters, and mean ROUGE-L."""
  n = max(len(responses), 1)
  out = {"n": len(responses), "stopped": sum(stopped) / n,
         "median_chars": statistics.median(map(len, responses)) if responses else 0,
         "loops": sum(map(repetition_loop, responses)) / n}
  if references is not None:
    out["reference_median_chars"] = statistics.median(map(len, references)) if references else 0
    out["within_3x_reference"] = sum(len(r) <= 3 * len(ref) + 200
                                     for ref, r in zip(references, responses)) / n
    out["rouge_l"] = statistics.fmean(rouge_l(references, responses)) if responses else 0.0
  return out
