"""The registry of constraint kinds (KINDS) and which kinds may share a prompt.

At most one kind of each exclusive group may appear, a JSON object takes only a few companions,
some pairs conflict, and HELD_OUT_PAIRS meet only in the eval split.
"""

from __future__ import annotations

import itertools

from jax_it.ifeval.constraints import (
  Constraint,
  Exclude,
  Frequency,
  Include,
  Lowercase,
  MaxWords,
  MinCapitalWords,
  MinSentences,
  NoCommas,
  Uppercase,
)
from jax_it.ifeval.formats import (
  Bullets,
  Ending,
  JsonKeys,
  Paragraphs,
  Placeholders,
  Postscript,
  Quote,
  Sections,
  Start,
  Title,
)

KINDS: dict[str, type[Constraint]] = {cls.id: cls for cls in (
    MaxWords, MinSentences, Bullets, Lowercase, Uppercase, NoCommas, Include, Exclude, Frequency,
    JsonKeys, Ending, Start, Paragraphs, Title, Quote, Placeholders, Postscript, MinCapitalWords,
    Sections)}
KIND_IDS = tuple(KINDS)


def constraint(spec: dict) -> Constraint:
  """The Constraint of a record's {"kind", "args"} entry."""
  if spec["kind"] not in KINDS:
    raise ValueError(f"unknown ifeval constraint kind {spec['kind']!r}")
  args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("args", {}).items()}
  return KINDS[spec["kind"]](**args)


# At most one kind of each group: one layout, one letter-case rule, one claim on the last line.
EXCLUSIVE_GROUPS = (
    frozenset({"format:bullets", "paragraphs:count", "format:sections", "format:json_keys"}),
    frozenset({"case:all_lowercase", "case:all_uppercase", "case:min_capital_words"}),
    frozenset({"ending:phrase", "format:postscript"}),
)
# A JSON object leaves no room for text around it, and its keys fix letter case and commas.
JSON_COMPANIONS = frozenset({
    "length:max_words", "keywords:include", "keywords:exclude", "keywords:frequency"})
# A wrapping quote would sit before the first bullet or section marker of the line.
CONFLICTS = frozenset({frozenset({"format:quote", "format:bullets"}),
                       frozenset({"format:quote", "format:sections"})})

# Pairs that meet only in the eval split.
HELD_OUT_PAIRS = (
    ("format:bullets", "case:all_uppercase"),
    ("format:json_keys", "keywords:frequency"),
    ("paragraphs:count", "format:title"),
    ("start:phrase", "format:postscript"),
    ("format:quote", "punct:no_commas"),
    ("length:min_sentences", "case:all_lowercase"),
    ("format:sections", "format:placeholders"),
    ("keywords:exclude", "ending:phrase"),
)


def compatible(kinds) -> bool:
  """Whether one response can obey all `kinds` at once (no kind twice, see the rules above)."""
  kinds = list(kinds)
  if len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
    return False
  for pair in map(frozenset, itertools.combinations(kinds, 2)):
    if pair in CONFLICTS or any(pair <= group for group in EXCLUSIVE_GROUPS):
      return False
    if "format:json_keys" in pair and not pair - {"format:json_keys"} <= JSON_COMPANIONS:
      return False
  return True


def held_out(kinds) -> bool:
  """Whether `kinds` hold a pair reserved for the eval split."""
  return any(set(pair) <= set(kinds) for pair in HELD_OUT_PAIRS)
