"""The Constraint base class and the kinds about length, letter case, commas and keywords.

Each kind has its train and eval phrasings, a checker for a response, and a plan that shapes a
Draft so its rendered response obeys the args; the kinds about layout and the lines around the
text are in formats, and kinds.KINDS lists them all.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import ClassVar

from jax_it.ifeval.draft import (
  _LETTERS,
  Draft,
  _content_words,
  _has_word,
  _occurrences,
  _show,
  count_words,
  sentences,
)
from jax_it.ifeval.topics import AVOID_WORDS


class Constraint:
  """One verifiable instruction; subclasses are frozen dataclasses whose fields are its args.

  `stage` orders planning: 0 picks the layout, 1 needs the layout, then facts are chosen; 2-4
  shape the facts, 5 adds lines around them, 6 changes the surface, then the draft is rendered;
  7 picks args that depend on the final text (what is absent from it, how long it is).
  """

  id: ClassVar[str]
  stage: ClassVar[int]
  train: ClassVar[tuple[str, ...]]
  eval: ClassVar[tuple[str, ...]]

  def check(self, response: str) -> bool:
    raise NotImplementedError

  @classmethod
  def plan(cls, rng: random.Random, d: Draft) -> Constraint:
    """Args for draft `d`, shaping `d` so that its rendered response obeys them."""
    raise NotImplementedError

  def args(self) -> dict:
    """The args as JSON values (lists, not tuples)."""
    out = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      out[field.name] = list(value) if isinstance(value, tuple) else value
    return out

  def spec(self) -> dict:
    return {"kind": self.id, "args": self.args()}

  def describe(self, rng: random.Random, split: str) -> str:
    """One of `split`'s phrasings, with the args filled in."""
    args = self.args()
    many = next((v for v in args.values() if isinstance(v, (int, list))), 2)
    many = many if isinstance(many, int) else len(many)
    values = {k: _show(v) for k, v in args.items()} | {"s": "" if many == 1 else "s"}
    return rng.choice(getattr(self, split)).format(**values)


@dataclasses.dataclass(frozen=True)
class MaxWords(Constraint):
  id: ClassVar[str] = "length:max_words"
  stage: ClassVar[int] = 7
  train: ClassVar[tuple[str, ...]] = (
      "Answer in at most {n} words.", "Do not use more than {n} words.",
      "Keep the whole response to {n} words or fewer.")
  eval: ClassVar[tuple[str, ...]] = (
      "Your reply must not exceed {n} words.", "Limit your answer to a maximum of {n} words.")
  n: int

  def check(self, response):
    return count_words(response) <= self.n

  @classmethod
  def plan(cls, rng, d):
    return cls((count_words(d.text) // 10 + 1) * 10 + 10 * rng.randint(0, 2))


@dataclasses.dataclass(frozen=True)
class MinSentences(Constraint):
  id: ClassVar[str] = "length:min_sentences"
  stage: ClassVar[int] = 1
  train: ClassVar[tuple[str, ...]] = (
      "Write at least {n} sentences.", "Your answer should have {n} or more sentences.",
      "Use a minimum of {n} sentences.")
  eval: ClassVar[tuple[str, ...]] = (
      "Use no fewer than {n} sentences.", "Make sure the reply contains {n} sentences or more.")
  n: int

  def check(self, response):
    return len(sentences(response)) >= self.n

  @classmethod
  def plan(cls, rng, d):
    n = rng.randint(3, 4)
    if d.layout == "bullets":  # one sentence a bullet, and the bullet count is fixed
      n = min(n, d.groups)
    d.min_sentences = n
    return cls(n)


@dataclasses.dataclass(frozen=True)
class Lowercase(Constraint):
  id: ClassVar[str] = "case:all_lowercase"
  stage: ClassVar[int] = 6
  train: ClassVar[tuple[str, ...]] = (
      "Your entire response must be in lowercase letters; no capital letters are allowed.",
      "Write everything in lowercase.", "Use only lowercase letters in your answer.")
  eval: ClassVar[tuple[str, ...]] = (
      "Do not use any capital letters at all.", "Type the whole reply in small letters only.")

  def check(self, response):
    return response == response.lower()

  @classmethod
  def plan(cls, rng, d):
    d.case = "lower"
    return cls()


@dataclasses.dataclass(frozen=True)
class Uppercase(Constraint):
  id: ClassVar[str] = "case:all_uppercase"
  stage: ClassVar[int] = 6
  train: ClassVar[tuple[str, ...]] = (
      "Your entire response must be in capital letters.", "Write the whole answer in uppercase.",
      "Use only uppercase letters in your answer.")
  eval: ClassVar[tuple[str, ...]] = (
      "Respond using only CAPITAL letters.", "Type every letter of the reply as a capital.")

  def check(self, response):
    return response == response.upper()

  @classmethod
  def plan(cls, rng, d):
    d.case = "upper"
    return cls()


@dataclasses.dataclass(frozen=True)
class NoCommas(Constraint):
  id: ClassVar[str] = "punct:no_commas"
  stage: ClassVar[int] = 6
  train: ClassVar[tuple[str, ...]] = (
      "Do not use any commas.", "Avoid commas in your entire response.",
      "Your answer must contain no commas.")
  eval: ClassVar[tuple[str, ...]] = (
      "Refrain from using a single comma.", "Leave out every comma from the reply.")

  def check(self, response):
    return "," not in response

  @classmethod
  def plan(cls, rng, d):
    d.no_commas = True
    return cls()


@dataclasses.dataclass(frozen=True)
class Include(Constraint):
  """Every word appears as a whole word, in any letter case."""

  id: ClassVar[str] = "keywords:include"
  stage: ClassVar[int] = 3
  train: ClassVar[tuple[str, ...]] = (
      "Include the keyword{s} {words}.", "Make sure to use the word{s} {words}.",
      "Your response must contain the word{s} {words}.")
  eval: ClassVar[tuple[str, ...]] = (
      "Your answer must mention {words}.", "Work the keyword{s} {words} into the reply.")
  words: tuple[str, ...]

  def check(self, response):
    return all(_has_word(response, w) for w in self.words)

  @classmethod
  def plan(cls, rng, d):
    words = _content_words(" ".join(d.facts))
    return cls(tuple(rng.sample(words, min(len(words), rng.randint(1, 2)))))


@dataclasses.dataclass(frozen=True)
class Exclude(Constraint):
  """No word appears as a whole word, in any letter case."""

  id: ClassVar[str] = "keywords:exclude"
  stage: ClassVar[int] = 7
  train: ClassVar[tuple[str, ...]] = (
      "Do not include the word{s} {words}.", "Avoid the word{s} {words}.",
      "Your response must not contain the word{s} {words}.")
  eval: ClassVar[tuple[str, ...]] = (
      "Never use the word{s} {words} in your reply.", "Keep {words} out of the reply entirely.")
  words: tuple[str, ...]

  def check(self, response):
    return not any(_has_word(response, w) for w in self.words)

  @classmethod
  def plan(cls, rng, d):
    pool = _content_words(" ".join(d.topic.facts)) + list(AVOID_WORDS)
    pool = [w for w in dict.fromkeys(pool) if not _has_word(d.text, w)]
    return cls(tuple(rng.sample(pool, rng.randint(1, 2))))


@dataclasses.dataclass(frozen=True)
class Frequency(Constraint):
  """`word` appears at least `n` times as a whole word, in any letter case."""

  id: ClassVar[str] = "keywords:frequency"
  stage: ClassVar[int] = 2
  train: ClassVar[tuple[str, ...]] = (
      'Use the word "{word}" at least {n} times.',
      'The word "{word}" should appear {n} or more times.',
      'Mention the word "{word}" a minimum of {n} times.')
  eval: ClassVar[tuple[str, ...]] = (
      'Say "{word}" no fewer than {n} times.',
      'Repeat the word "{word}" at least {n} times across the reply.')
  word: str
  n: int

  def check(self, response):
    return _occurrences(response, self.word) >= self.n

  @classmethod
  def plan(cls, rng, d):
    word = d.topic.keyword
    have = lambda: sum(_occurrences(f, word) for f in d.facts) + ("topic" in d.json_keys)
    spare = [f for f in d.topic.facts if f not in d.facts and _has_word(f, word)]
    for i, fact in enumerate(d.facts):  # swap in facts that hold the word until 3 are there
      if have() >= 3 or not spare:
        break
      if not _has_word(fact, word):
        d.facts[i] = spare.pop(0)
    return cls(word, rng.randint(2, min(3, have())))


@dataclasses.dataclass(frozen=True)
class MinCapitalWords(Constraint):
  """At least n words of two or more letters written all in capitals ("I" and "P.S." aside)."""

  id: ClassVar[str] = "case:min_capital_words"
  stage: ClassVar[int] = 4
  train: ClassVar[tuple[str, ...]] = (
      "Write at least {n} word{s} in all capital letters for emphasis.",
      "Use {n} or more fully capitalized word{s}, like IMPORTANT.",
      "Include a minimum of {n} word{s} written entirely in uppercase.")
  eval: ClassVar[tuple[str, ...]] = (
      "Stress at least {n} word{s} by writing them entirely in capitals.",
      "Put no fewer than {n} word{s} in ALL CAPS.")
  n: int

  def check(self, response):
    return sum(len(w) > 1 and w.isupper() for w in _LETTERS.findall(response)) >= self.n

  @classmethod
  def plan(cls, rng, d):
    n = rng.randint(1, 3)
    pick = rng.sample(_content_words(" ".join(d.facts)), n)
    loud = re.compile(r"\b(" + "|".join(map(re.escape, pick)) + r")\b", re.IGNORECASE)
    d.facts = [loud.sub(lambda m: m.group(0).upper(), f) for f in d.facts]
    return cls(n)
