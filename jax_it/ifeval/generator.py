"""The generator: builds a response for a set of constraint kinds and makes records of a split.

The eval split holds out task topics, task and constraint phrasings, and some pairs of constraint
kinds (HELD_OUT_PAIRS) that meet only there, so it measures whether a model follows constraints it
has not seen worded or combined that way.
"""

from __future__ import annotations

import random

from jax_it.ifeval.draft import Draft, _pick_facts, _render, count_words
from jax_it.ifeval.kinds import HELD_OUT_PAIRS, KIND_IDS, KINDS, compatible, held_out
from jax_it.ifeval.topics import SPLITS, TASKS, TOPICS, Topic

FAMILY = "ifeval"
MAX_OUTPUT_WORDS = 80
_TRIES = 50


def _build(kinds: list[str], topic: Topic, rng: random.Random) -> tuple[str, dict] | None:
  """(output, {kind: Constraint}) obeying every kind, or None when the draft came out too long."""
  d = Draft(topic)
  made = {}
  for kind in sorted(kinds, key=lambda k: KINDS[k].stage):
    cls = KINDS[kind]
    if cls.stage >= 2 and not d.facts:
      _pick_facts(d, rng)
    if cls.stage >= 7 and not d.text:
      d.text = _render(d)
    made[kind] = cls.plan(rng, d)
  if not d.facts:
    _pick_facts(d, rng)
  output = d.text or _render(d)
  if count_words(output) > MAX_OUTPUT_WORDS:
    return None
  if not all(c.check(output) for c in made.values()):  # a bug in a plan, not bad luck
    raise AssertionError(f"ifeval built an output that breaks its constraints: {output!r}")
  return output, made


def make_record(kinds, rng: random.Random, split: str = "train") -> dict:
  """One record whose constraints are `kinds` (in this order), worded for `split`."""
  kinds = list(kinds)
  if not compatible(kinds):
    raise ValueError(f"ifeval constraint kinds {kinds} cannot share a prompt")
  for _ in range(_TRIES):
    topic = rng.choice(TOPICS[split])
    built = _build(kinds, topic, rng)
    if built is not None:
      break
  else:
    raise RuntimeError(f"ifeval found no output under {MAX_OUTPUT_WORDS} words for {kinds}")
  output, made = built
  parts = [rng.choice(TASKS[split]).format(topic=topic.name)]
  parts += [made[k].describe(rng, split) for k in kinds]
  return {"instruction": " ".join(parts), "input": "", "output": output,
          "constraints": [made[k].spec() for k in kinds], "family": FAMILY}


def _choose_kinds(rng: random.Random, split: str, i: int) -> list[str]:
  count = rng.choice((1, 2, 2, 3))
  if split == "eval" and i % 2:  # every other eval prompt is built around a held-out pair
    kinds = list(rng.choice(HELD_OUT_PAIRS))
    rng.shuffle(kinds)
  else:  # cycle the first kind so every kind is equally common
    kinds = [KIND_IDS[(i // 2 if split == "eval" else i) % len(KIND_IDS)]]
  while len(kinds) < count:
    options = [k for k in KIND_IDS if compatible(kinds + [k])
               and (split == "eval" or not held_out(kinds + [k]))]
    if not options:
      break
    kinds.append(rng.choice(options))
  return kinds


def generate(n: int, seed: int = 0, split: str = "train") -> list[dict]:
  """`n` records of `split`, the same for the same (n, seed, split)."""
  if split not in SPLITS:
    raise ValueError(f"ifeval split {split!r} is not one of {', '.join(SPLITS)}")
  if n < 0:
    raise ValueError(f"ifeval record count must be >= 0, got {n}")
  rng = random.Random(f"jax_it.ifeval/{seed}/{split}")
  records = [make_record(_choose_kinds(rng, split, i), rng, split) for i in range(n)]
  rng.shuffle(records)
  return records
