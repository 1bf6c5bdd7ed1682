"""Verifiable instruction-following prompts in the manner of IFEval (Zhou et al. 2023).

Each record asks for a short piece of writing about a topic plus one to three constraints that a
program checks (a word limit, exactly N bullets, all lowercase, a JSON object, a title in
<<brackets>>, ...). Records use the Alpaca schema plus a "constraints" list,
{"instruction", "input": "", "output", "constraints": [{"kind", "args"}], "family": "ifeval"}, so
they train and evaluate through the same pipeline as jax_it.synth; "output" is a built response
that obeys every constraint and stays under MAX_OUTPUT_WORDS words, short enough for a 270M model.
The parts live in topics (subjects, tasks, argument pools), draft (text helpers and the response
being built), constraints and formats (the kinds and their checkers), kinds (the registry and which
kinds may share a prompt), generator (records) and scoring (IFEval strict and loose accuracy).
"""

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
from jax_it.ifeval.draft import Draft, count_words, sentences
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
from jax_it.ifeval.generator import FAMILY, MAX_OUTPUT_WORDS, generate, make_record
from jax_it.ifeval.kinds import (
  CONFLICTS,
  EXCLUSIVE_GROUPS,
  HELD_OUT_PAIRS,
  JSON_COMPANIONS,
  KIND_IDS,
  KINDS,
  compatible,
  constraint,
  held_out,
)
from jax_it.ifeval.scoring import check, loose_variants, score
from jax_it.ifeval.topics import (
  AVOID_WORDS,
  END_PHRASES,
  JSON_KEYS,
  PLACEHOLDER_LINES,
  PS_NOTES,
  SPLITS,
  START_PHRASES,
  TASKS,
  TITLES,
  TOPICS,
  Topic,
)

__all__ = [
    "AVOID_WORDS", "CONFLICTS", "END_PHRASES", "EXCLUSIVE_GROUPS", "FAMILY", "HELD_OUT_PAIRS",
    "JSON_COMPANIONS", "JSON_KEYS", "KINDS", "KIND_IDS", "MAX_OUTPUT_WORDS", "PLACEHOLDER_LINES",
    "PS_NOTES", "SPLITS", "START_PHRASES", "TASKS", "TITLES", "TOPICS", "Bullets", "Constraint",
    "Draft", "Ending", "Exclude", "Frequency", "Include", "JsonKeys", "Lowercase", "MaxWords",
    "MinCapitalWords", "MinSentences", "NoCommas", "Paragraphs", "Placeholders", "Postscript",
    "Quote", "Sections", "Start", "Title", "Topic", "Uppercase", "check", "compatible",
    "constraint", "count_words", "generate", "held_out", "loose_variants", "make_record", "score",
    "sentences",
]
