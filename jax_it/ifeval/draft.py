"""Text helpers shared by checkers and the generator, and the response the generator builds.

A Draft is that response before it is rendered to text: each constraint's plan shapes it (layout,
facts, lines around them, letter case), then `_render` turns it into the output.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

from jax_it.ifeval.topics import _STOP, Topic

_WORD = re.compile(r"\w+")
_LETTERS = re.compile(r"[A-Za-z]+")


def count_words(text: str) -> int:
  """Runs of word characters, as IFEval counts words (so "[name]" and "64" are one word each)."""
  return len(_WORD.findall(text))


def sentences(text: str) -> list[str]:
  """Pieces split at . ! ? before whitespace and at line breaks, kept when they hold two or
  more words of two or more letters: "P.S." or a lone "Section 2" is not a sentence."""
  pieces = re.split(r"(?<=[.!?])\s+|\n", text)
  return [p for p in pieces if len([w for w in _LETTERS.findall(p) if len(w) > 1]) >= 2]


def _has_word(text: str, word: str) -> bool:
  return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def _occurrences(text: str, word: str) -> int:
  return len(re.findall(rf"\b{re.escape(word)}\b", text, re.IGNORECASE))


def _unquote(text: str) -> str:
  """`text` stripped, without one pair of wrapping double quotes (so format:quote composes)."""
  text = text.strip()
  if len(text) > 1 and text[0] == text[-1] == '"':
    text = text[1:-1].strip()
  return text


def _content_words(text: str) -> list[str]:
  """Distinct lowercased words of 4+ letters that are not too common, in order of appearance."""
  words = (w.lower() for w in _LETTERS.findall(text))
  return list(dict.fromkeys(w for w in words if len(w) >= 4 and w not in _STOP))


def _show(value) -> str:
  """An argument as a phrasing shows it: lists as '"a", "b" and "c"'."""
  if isinstance(value, (list, tuple)):
    quoted = [f'"{v}"' for v in value]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
  return str(value)


@dataclasses.dataclass
class Draft:
  topic: Topic
  layout: str = "plain"  # plain | bullets | paragraphs | sections | json
  groups: int = 1  # bullets, paragraphs or sections
  per_group: int = 1  # facts per paragraph or section
  json_keys: tuple[str, ...] = ()
  min_sentences: int = 0
  facts: list[str] = dataclasses.field(default_factory=list)
  start: str = ""
  title: str = ""
  placeholders: str = ""
  postscript: str = ""
  ending: str = ""
  no_commas: bool = False
  case: str = ""  # "", "lower" or "upper"
  quote: bool = False
  text: str = ""  # set by _render, for the kinds whose args depend on the final text


def _pick_facts(d: Draft, rng: random.Random) -> None:
  if d.layout == "bullets":
    need = d.groups
  elif d.layout in ("paragraphs", "sections"):
    d.per_group = max(rng.choice((1, 2)) if d.groups == 2 else 1, -(-d.min_sentences // d.groups))
    need = d.groups * d.per_group
  elif d.layout == "json":
    need = sum(key != "topic" for key in d.json_keys)
  else:
    need = max(rng.randint(2, 3), d.min_sentences)
  d.facts = [d.topic.facts[i] for i in sorted(rng.sample(range(len(d.topic.facts)), need))]


def _render(d: Draft) -> str:
  if d.layout == "json":
    facts = iter(d.facts)
    return json.dumps({k: d.topic.name if k == "topic" else next(facts) for k in d.json_keys})
  groups = [d.facts[i * d.per_group:(i + 1) * d.per_group] for i in range(d.groups)]
  if d.placeholders and d.layout != "bullets":
    groups[-1] = groups[-1] + [d.placeholders]
  if d.layout == "bullets":
    body = "\n".join(f"* {fact}" for fact in d.facts)
    if d.placeholders:
      body += "\n" + d.placeholders
  elif d.layout == "paragraphs":
    body = "\n***\n".join(" ".join(g) for g in groups)
  elif d.layout == "sections":
    body = "\n\n".join(f"Section {i}\n" + " ".join(g) for i, g in enumerate(groups, 1))
  else:
    body = " ".join(d.facts + ([d.placeholders] if d.placeholders else []))
  head = [d.start] if d.start else []
  if d.title:
    head.append(f"<<{d.title}>>")
  text = "\n".join(head + [body])
  if d.postscript:
    text += "\n\n" + d.postscript
  if d.ending:
    text += "\n" + d.ending
  if d.no_commas:
    text = text.replace(",", "")
  if d.case == "lower":
    text = text.lower()
  elif d.case == "upper":
    text = text.upper()
  return f'"{text}"' if d.quote else text
