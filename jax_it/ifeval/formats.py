"""The constraint kinds about layout (bullets, paragraphs, sections, JSON) and added text.

Added text is what a response must open or close with, a title, placeholders, a postscript and
wrapping quotes; the Constraint base class and the other kinds are in constraints.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import ClassVar

from jax_it.ifeval.constraints import Constraint
from jax_it.ifeval.draft import _unquote
from jax_it.ifeval.topics import (
  END_PHRASES,
  JSON_KEYS,
  PLACEHOLDER_LINES,
  PS_NOTES,
  START_PHRASES,
  TITLES,
)


@dataclasses.dataclass(frozen=True)
class Bullets(Constraint):
  """Exactly n markdown bullets: lines that start with "* " or "- "."""

  id: ClassVar[str] = "format:bullets"
  stage: ClassVar[int] = 0
  train: ClassVar[tuple[str, ...]] = (
      'Answer with exactly {n} bullet points, using markdown bullets such as "* point".',
      "Format your answer as a markdown list of exactly {n} bullets.",
      "Your response must contain exactly {n} markdown bullet points.")
  eval: ClassVar[tuple[str, ...]] = (
      'Give precisely {n} bullet points in markdown, like "* this".',
      "Present the answer as {n} markdown bullet items, no more and no fewer.")
  n: int

  def check(self, response):
    return len(re.findall(r"^[ \t]*[*-][ \t]+\S", response, re.MULTILINE)) == self.n

  @classmethod
  def plan(cls, rng, d):
    d.layout, d.groups = "bullets", rng.randint(2, 4)
    return cls(d.groups)


@dataclasses.dataclass(frozen=True)
class JsonKeys(Constraint):
  """The whole response (a ```json fence allowed, as IFEval allows) is one JSON object with
  exactly these keys."""

  id: ClassVar[str] = "format:json_keys"
  stage: ClassVar[int] = 0
  train: ClassVar[tuple[str, ...]] = (
      "Wrap your entire output in JSON: a single object with exactly the keys {keys}.",
      "Answer only with a JSON object whose keys are exactly {keys}.",
      "Format the whole response as one JSON object with the keys {keys} and no others.")
  eval: ClassVar[tuple[str, ...]] = (
      "Reply with nothing but a JSON object that has precisely the keys {keys}.",
      "Return a single JSON object, keyed by {keys} only, as your entire reply.")
  keys: tuple[str, ...]

  def check(self, response):
    text = response.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL | re.IGNORECASE)
    try:
      value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
      return False
    return isinstance(value, dict) and set(value) == set(self.keys)

  @classmethod
  def plan(cls, rng, d):
    d.layout, d.json_keys = "json", tuple(rng.sample(JSON_KEYS, rng.randint(2, 3)))
    return cls(d.json_keys)


@dataclasses.dataclass(frozen=True)
class Ending(Constraint):
  """The response, less wrapping quotes, ends with `phrase` in any letter case."""

  id: ClassVar[str] = "ending:phrase"
  stage: ClassVar[int] = 5
  train: ClassVar[tuple[str, ...]] = (
      'End your response with the exact phrase "{phrase}" with no other words after it.',
      'Finish your answer with "{phrase}" and nothing after it.',
      'The last words of your response must be "{phrase}" exactly.')
  eval: ClassVar[tuple[str, ...]] = (
      'Close your reply with the exact phrase "{phrase}" and add nothing after it.',
      'Make "{phrase}" the final words of the reply.')
  phrase: str

  def check(self, response):
    return _unquote(response).lower().endswith(self.phrase.lower())

  @classmethod
  def plan(cls, rng, d):
    d.ending = rng.choice(END_PHRASES)
    return cls(d.ending)


@dataclasses.dataclass(frozen=True)
class Start(Constraint):
  """The response, less wrapping quotes, starts with `phrase` in any letter case."""

  id: ClassVar[str] = "start:phrase"
  stage: ClassVar[int] = 5
  train: ClassVar[tuple[str, ...]] = (
      'Start your response with the exact phrase "{phrase}"',
      'Begin your answer with "{phrase}" word for word.',
      'The first words of your response must be "{phrase}" exactly.')
  eval: ClassVar[tuple[str, ...]] = (
      'Open your reply with the words "{phrase}" exactly.',
      'Let the reply start with the phrase "{phrase}" as written.')
  phrase: str

  def check(self, response):
    return _unquote(response).lower().startswith(self.phrase.lower())

  @classmethod
  def plan(cls, rng, d):
    d.start = rng.choice(START_PHRASES)
    return cls(d.start)


@dataclasses.dataclass(frozen=True)
class Paragraphs(Constraint):
  """Exactly n non-empty paragraphs separated, as in IFEval, by lines holding only ***."""

  id: ClassVar[str] = "paragraphs:count"
  stage: ClassVar[int] = 0
  train: ClassVar[tuple[str, ...]] = (
      "Write exactly {n} paragraphs separated by the markdown divider ***.",
      "Your answer must have {n} paragraphs; put a line with *** between paragraphs.",
      "Use {n} paragraphs in total, divided from each other by a *** line.")
  eval: ClassVar[tuple[str, ...]] = (
      "Split your response into {n} paragraphs, using *** on its own line between them.",
      "Compose {n} paragraphs and separate them with *** dividers.")
  n: int

  def check(self, response):
    chunks = re.split(r"^[ \t]*\*\*\*[ \t]*$", response, flags=re.MULTILINE)
    return len(chunks) == self.n and all(c.strip() for c in chunks)

  @classmethod
  def plan(cls, rng, d):
    d.layout, d.groups = "paragraphs", rng.randint(2, 3)
    return cls(d.groups)


@dataclasses.dataclass(frozen=True)
class Title(Constraint):
  id: ClassVar[str] = "format:title"
  stage: ClassVar[int] = 5
  train: ClassVar[tuple[str, ...]] = (
      "Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
      "Include a title in the form <<title>>.",
      "Add a title written between << and >>.")
  eval: ClassVar[tuple[str, ...]] = (
      "Put a title inside double angle brackets, for example <<a title>>, in your response.",
      "Head the reply with a title enclosed in <<double angular brackets>>.")

  def check(self, response):
    return any(t.strip() for t in re.findall(r"<<([^\n]*?)>>", response))

  @classmethod
  def plan(cls, rng, d):
    d.title = rng.choice(TITLES).format(name=d.topic.name.title())
    return cls()


@dataclasses.dataclass(frozen=True)
class Quote(Constraint):
  id: ClassVar[str] = "format:quote"
  stage: ClassVar[int] = 6
  train: ClassVar[tuple[str, ...]] = (
      "Wrap your entire response in double quotation marks.",
      "Put the whole answer inside double quotes.",
      "Your response must begin and end with a double quote.")
  eval: ClassVar[tuple[str, ...]] = (
      "Enclose everything you write in a pair of double quotes.",
      "Surround the full reply with double quotation marks.")

  def check(self, response):
    text = response.strip()
    return len(text) > 1 and text[0] == text[-1] == '"'

  @classmethod
  def plan(cls, rng, d):
    d.quote = True
    return cls()


@dataclasses.dataclass(frozen=True)
class Placeholders(Constraint):
  id: ClassVar[str] = "format:placeholders"
  stage: ClassVar[int] = 5
  train: ClassVar[tuple[str, ...]] = (
      "Include at least {n} placeholder{s} in square brackets, such as [name].",
      "Use {n} or more placeholder{s} written in square brackets, like [address].",
      "Your answer must hold at least {n} placeholder{s} such as [date].")
  eval: ClassVar[tuple[str, ...]] = (
      "Add no fewer than {n} placeholder{s} in square brackets, e.g. [city].",
      "Leave at least {n} blank{s} to fill in, each written as a [placeholder].")
  n: int

  def check(self, response):
    return len(re.findall(r"\[[^\[\]\n]*\w[^\[\]\n]*\]", response)) >= self.n

  @classmethod
  def plan(cls, rng, d):
    n = rng.randint(1, 3)
    d.placeholders = rng.choice(PLACEHOLDER_LINES[n])
    return cls(n)


@dataclasses.dataclass(frozen=True)
class Postscript(Constraint):
  """The last non-empty line (wrapping quotes aside) starts with `marker` and says something."""

  id: ClassVar[str] = "format:postscript"
  stage: ClassVar[int] = 5
  train: ClassVar[tuple[str, ...]] = (
      "At the end of your response, add a postscript starting with {marker}",
      'Finish with a postscript that begins with "{marker}".',
      "End the answer with a postscript line that starts with {marker}")
  eval: ClassVar[tuple[str, ...]] = (
      "Close with a note that starts with {marker} after the main answer.",
      "After everything else, append a short postscript marked {marker}")
  marker: str

  def check(self, response):
    lines = [line for line in _unquote(response).split("\n") if line.strip()]
    pattern = rf"[ \t]*{re.escape(self.marker)}[ \t]*\w"
    return bool(lines) and re.match(pattern, lines[-1], re.IGNORECASE) is not None

  @classmethod
  def plan(cls, rng, d):
    marker = rng.choice(("P.S.", "P.S.", "P.P.S."))
    d.postscript = f"{marker} {rng.choice(PS_NOTES)}"
    return cls(marker)


@dataclasses.dataclass(frozen=True)
class Sections(Constraint):
  """Exactly n sections, each opened by a line starting "Section k" (k = 1..n in order, any
  letter case) and holding some text after that marker."""

  id: ClassVar[str] = "format:sections"
  stage: ClassVar[int] = 0
  train: ClassVar[tuple[str, ...]] = (
      "Divide your answer into {n} sections, marking the start of each with Section X, "
      "like Section 1.",
      "Organise the response into {n} sections labelled Section 1, Section 2 and so on.",
      "Your answer must have {n} sections, each starting with a line Section X.")
  eval: ClassVar[tuple[str, ...]] = (
      "Split the reply into {n} parts, each headed Section X where X is its number.",
      "Break the reply into {n} numbered parts that begin with Section 1, Section 2 and so on.")
  n: int

  def check(self, response):
    heads = list(re.finditer(r"^[ \t]*section[ \t]+(\d+)\b", response,
                             re.IGNORECASE | re.MULTILINE))
    if [int(m.group(1)) for m in heads] != list(range(1, self.n + 1)):
      return False
    ends = [m.start() for m in heads[1:]] + [len(response)]
    return all(re.search(r"\w", response[m.end():end]) for m, end in zip(heads, ends))

  @classmethod
  def plan(cls, rng, d):
    d.layout, d.groups = "sections", rng.randint(2, 3)
    return cls(d.groups)
