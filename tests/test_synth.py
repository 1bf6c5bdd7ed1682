"""Tests for jax_it.synth: determinism, coverage, disjoint splits, exact answers."""

import json
import re

import pytest

from jax_it import synth


@pytest.fixture(scope="module")
def splits():
  return {split: synth.generate(3000, seed=0, split=split) for split in synth.SPLITS}


def test_deterministic_and_seed_dependent():
  assert synth.generate(200, 7, "train") == synth.generate(200, 7, "train")
  assert synth.generate(200, 7, "train") != synth.generate(200, 8, "train")
  assert synth.generate(0, 0, "eval") == []


def test_schema_and_families(splits):
  assert len(synth.FAMILY_NAMES) >= 12 and len(set(synth.FAMILY_NAMES)) == len(synth.FAMILIES)
  for records in splits.values():
    assert {r["family"] for r in records} == set(synth.FAMILY_NAMES)
    for r in records:
      assert set(r) >= {"instruction", "input", "output"}
      assert all(isinstance(r[k], str) for k in ("instruction", "input", "output"))
      assert r["instruction"] and r["output"] and "{" not in r["instruction"].replace('{"', "")


def test_with_and_without_input(splits):
  for records in splits.values():
    with_input = sum(bool(r["input"]) for r in records)
    assert 0.2 < with_input / len(records) < 0.8


def test_phrasings_vary_and_are_held_out():
  for family in synth.FAMILIES:
    assert len(family.train) >= 3 and len(family.eval) >= 2, family.name
    assert not set(family.train) & set(family.eval), family.name
    assert any(t[1] is None for t in family.train + family.eval), family.name
    assert any(t[1] is not None for t in family.train + family.eval), family.name


def test_splits_do_not_overlap(splits):
  pairs = {s: {(r["instruction"], r["input"]) for r in rs} for s, rs in splits.items()}
  assert not pairs["train"] & pairs["eval"]
  # no eval record reads as an instance of any training phrasing
  train_patterns = [_pattern(t) for f in synth.FAMILIES for t in f.train]
  for r in splits["train"][:200]:
    assert any(p.fullmatch(r["instruction"] + "\x00" + r["input"]) for p in train_patterns), r
  for r in splits["eval"]:
    assert not any(p.fullmatch(r["instruction"] + "\x00" + r["input"]) for p in train_patterns), r


def _pattern(template):
  """A regex matching every rendering of a (instruction, input) template."""
  text = template[0] + "\x00" + (template[1] or "")
  return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(text)), re.DOTALL)


def test_answers_short_and_simple(splits):
  for r in splits["train"]:
    assert len(r["output"].split()) <= 6, r
    assert all(int(n) < 100 for n in re.findall(r"\d+", r["instruction"] + r["input"])), r


def test_every_answer_is_correct_and_wrong_ones_fail(splits):
  for r in splits["train"] + splits["eval"]:
    assert synth.is_correct(r, r["output"])
    assert synth.is_correct(r, f"  {r['output']}\n")
    assert not synth.is_correct(r, r["output"] + ".")
    assert not synth.is_correct(r, r["output"] + " x")
    assert not synth.is_correct(r, "")


def test_hand_checked_answers():
  by_family = {}
  for r in synth.generate(400, 3, "train"):
    by_family.setdefault(r["family"], r)
  r = by_family["add"]
  a, b = map(int, re.findall(r"\d+", r["instruction"] + " " + r["input"]))
  assert r["output"] == str(a + b)
  r = by_family["reverse_words"]
  words = (r["input"] or r["instruction"].split(": ", 1)[1]).split()
  assert r["output"] == " ".join(words[::-1])
  r = by_family["json_key"]
  assert len(json.loads(r["output"])) == 1
  r = by_family["uppercase"]
  assert r["output"] == r["output"].upper()
  assert r["output"].lower() in r["instruction"] + r["input"]


def test_bad_arguments():
  with pytest.raises(ValueError, match="split 'test'"):
    synth.generate(3, 0, "test")
  with pytest.raises(ValueError, match=">= 0"):
    synth.generate(-1, 0, "train")
