"""Tests for jax_it.ifeval: checkers, built outputs, compatibility, held-out splits, scores."""

import itertools
import random
import re

import pytest

from jax_it import ifeval


@pytest.fixture(scope="module")
def splits():
  return {split: ifeval.generate(600, seed=0, split=split) for split in ifeval.SPLITS}


def _kinds(record):
  return [c["kind"] for c in record["constraints"]]


def _pairs(records):
  return {frozenset(p) for r in records for p in itertools.combinations(_kinds(r), 2)}


def test_deterministic_and_seed_dependent():
  assert ifeval.generate(100, 7, "train") == ifeval.generate(100, 7, "train")
  assert ifeval.generate(100, 7, "train") != ifeval.generate(100, 8, "train")
  assert ifeval.generate(100, 7, "eval") != ifeval.generate(100, 7, "train")
  assert ifeval.generate(0, 0, "eval") == []


def test_kinds_and_phrasings():
  assert len(ifeval.KINDS) >= 15
  for kind, cls in ifeval.KINDS.items():
    assert cls.id == kind and re.fullmatch(r"[a-z]+:[a-z_]+", kind)
    assert len(cls.train) >= 2 and len(cls.eval) >= 2, kind
    assert not set(cls.train) & set(cls.eval), kind


def test_schema_and_coverage(splits):
  for records in splits.values():
    assert {k for r in records for k in _kinds(r)} == set(ifeval.KIND_IDS)
    assert {len(r["constraints"]) for r in records} == {1, 2, 3}
    for r in records:
      assert set(r) == {"instruction", "input", "output", "constraints", "family"}
      assert r["input"] == "" and r["family"] == "ifeval" and r["instruction"] and r["output"]
      assert "{" not in r["instruction"] and "}" not in r["instruction"], r["instruction"]
      assert ifeval.compatible(_kinds(r)), r
      assert ifeval.count_words(r["output"]) <= ifeval.MAX_OUTPUT_WORDS, r
      assert [ifeval.constraint(c).spec() for c in r["constraints"]] == r["constraints"]


def test_generated_outputs_pass_their_own_constraints(splits):
  for r in splits["train"] + splits["eval"]:
    assert all(ifeval.check(r, r["output"])), r
    assert all(ifeval.check(r, r["output"], loose=True)), r
    assert not any(ifeval.check(r, "")), r


# (kind, args, responses that pass, responses that fail), all written by hand
CASES = [
    ("length:max_words", {"n": 5}, ["One two three four five.", "Short."],
     ["One two three four five six.", "[a] [b] [c] [d] [e] [f]"]),
    ("length:min_sentences", {"n": 3},
     ["Bees fly far. They make honey! Do you like it?",
      "* Cats sleep a lot\n* Dogs bark loudly\n* Fish swim fast"],
     ["Bees fly far. They make honey.", "P.S. Hi there. Yes. No."]),
    ("format:bullets", {"n": 2}, ["* red\n* blue", "Colors:\n- red\n- blue\nThat is all."],
     ["* red\n* blue\n* green", "**red** and **blue**\n***\n* one", "-red\n-blue"]),
    ("case:all_lowercase", {}, ["bees make honey.", "p.s. 42 [name]"],
     ["Bees make honey.", "bees make HONEY."]),
    ("case:all_uppercase", {}, ["BEES MAKE HONEY.", "P.S. 42!"], ["BEES make honey.", "Bees"]),
    ("punct:no_commas", {}, ["Red and blue.", "Red; blue."], ["Red, blue.", "a,b"]),
    ("keywords:include", {"words": ["honey", "hive"]}, ["The HIVE holds Honey.", "honey, hive"],
     ["The hive holds nectar.", "Honeybees build hives."]),
    ("keywords:exclude", {"words": ["sugar", "milk"]}, ["Tea with lemon.", "Sugary milky drinks."],
     ["Tea with Sugar.", "no milk"]),
    ("keywords:frequency", {"word": "rain", "n": 2}, ["Rain, rain, go away.", "RAIN; rain."],
     ["Rain falls. Rainbows follow.", "It rains and rained."]),
    ("format:json_keys", {"keys": ["topic", "fact"]},
     ['{"topic": "tea", "fact": "Tea is hot."}', '```json\n{"fact": 1, "topic": [2]}\n```'],
     ['{"topic": "tea"}', '{"topic": "tea", "fact": "x", "note": "y"}',
      'Here: {"topic": "tea", "fact": "x"}', '["topic", "fact"]']),
    ("ending:phrase", {"phrase": "Hope this helps."},
     ["Bees fly. Hope this helps.", '"Bees fly. hope this helps."'],
     ["Hope this helps. Bees fly.", "Bees fly. Hope this helps!"]),
    ("start:phrase", {"phrase": "Sure thing."}, ["Sure thing. Bees fly.", '"sure thing. bees"'],
     ["Bees fly. Sure thing.", "Sure, thing. Bees fly."]),
    ("paragraphs:count", {"n": 2},
     ["First part.\n***\nSecond part.", "First.\n\n  ***  \n\nSecond.\nStill second."],
     ["One paragraph only.", "First.\n***\n***\nSecond.", "A\n***\nB\n***\nC",
      "First. *** Second."]),
    ("format:title", {}, ["<<Bees>>\nBees fly.", "About <<the sea>> today."],
     ["Bees\nBees fly.", "<<  >> empty", "<Bees>", "<<Bees\n>>"]),
    ("format:quote", {}, ['"Bees fly."', '  "Bees fly."\n'], ["Bees fly.", '"Bees fly.', '"']),
    ("format:placeholders", {"n": 2}, ["Dear [name], see you on [date].", "[a] [b] [c]"],
     ["Dear [name].", "Dear [] and [ ]."]),
    ("format:postscript", {"marker": "P.S."}, ["Bees fly.\n\nP.S. Thanks.", '"Bees.\np.s. bye."'],
     ["P.S. Thanks.\nBees fly.", "Bees fly. P.S. thanks.", "Bees fly.\nP.P.S. Thanks.",
      "Bees fly.\nP.S."]),
    ("case:min_capital_words", {"n": 2}, ["Bees are VERY BUSY.", "USE CAPS"],
     ["Bees are VERY busy.", "I saw A cat. P.S. OK"]),
    ("format:sections", {"n": 2},
     ["Section 1\nBees fly.\nSection 2\nBees sting.",
      "Intro.\nSECTION 1: Bees fly.\nsection 2 Bees sting."],
     ["Section 1\nBees fly.", "Section 1\nBees fly.\nSection 3\nBees sting.",
      "Section 1\nSection 2\nBees sting.", "Section 2\nA.\nSection 1\nB."]),
]


def test_hand_written_cases_cover_every_kind():
  assert {case[0] for case in CASES} == set(ifeval.KIND_IDS)


@pytest.mark.parametrize("kind,args,good,bad", CASES, ids=[case[0] for case in CASES])
def test_checker_on_hand_written_responses(kind, args, good, bad):
  record = {"constraints": [{"kind": kind, "args": args}]}
  for response in good:
    assert ifeval.check(record, response) == [True], response
  for response in bad:
    assert ifeval.check(record, response) == [False], response


def test_loose_variants():
  variants = ifeval.loose_variants("Sure:\n**a**\nb\nbye")
  assert variants == ["Sure:\n**a**\nb\nbye", "**a**\nb\nbye", "Sure:\n**a**\nb", "**a**\nb",
                      "Sure:\na\nb\nbye", "a\nb\nbye", "Sure:\na\nb", "a\nb"]


@pytest.mark.parametrize("kind,args,response", [
    ("case:all_lowercase", {}, "Sure, here it is:\nbees make honey."),
    ("format:json_keys", {"keys": ["topic"]}, 'Here is the JSON:\n{"topic": "tea"}'),
    ("start:phrase", {"phrase": "Sure thing."}, "**Sure thing.** Bees fly."),
    ("format:sections", {"n": 2}, "**Section 1**\nBees fly.\n**Section 2**\nBees sting."),
    ("ending:phrase", {"phrase": "Hope this helps."}, "Bees fly. Hope this helps.\nBye!"),
    ("format:quote", {}, 'Here you go:\n"Bees fly."\nEnjoy!'),
])
def test_loose_passes_where_strict_fails(kind, args, response):
  record = {"constraints": [{"kind": kind, "args": args}]}
  assert ifeval.check(record, response) == [False]
  assert ifeval.check(record, response, loose=True) == [True]


def test_loose_still_fails_inside_the_response():
  record = {"constraints": [{"kind": "case:all_lowercase", "args": {}}]}
  assert ifeval.check(record, "Sure.\nBees Make honey.\nbye", loose=True) == [False]
  assert ifeval.check(record, "   \n", loose=True) == [False]


def test_compatibility_rule():
  assert ifeval.compatible(["format:bullets", "case:all_uppercase", "punct:no_commas"])
  assert ifeval.compatible(["format:json_keys", "keywords:include", "length:max_words"])
  for kinds in (["case:all_lowercase", "case:all_uppercase"],
                ["case:all_uppercase", "case:min_capital_words"],
                ["format:json_keys", "format:bullets"], ["format:json_keys", "punct:no_commas"],
                ["format:json_keys", "format:title"], ["paragraphs:count", "format:sections"],
                ["ending:phrase", "format:postscript"], ["format:quote", "format:bullets"],
                ["punct:no_commas", "punct:no_commas"], ["format:title", "no:such_kind"]):
    assert not ifeval.compatible(kinds), kinds
    assert not ifeval.compatible(kinds[::-1]), kinds
    with pytest.raises(ValueError, match="cannot share"):
      ifeval.make_record(kinds, random.Random(0))
  # the contradictions are real: no text with a letter is both all lowercase and all uppercase
  lower = ifeval.constraint({"kind": "case:all_lowercase", "args": {}})
  upper = ifeval.constraint({"kind": "case:all_uppercase", "args": {}})
  assert not any(lower.check(t) and upper.check(t) for t in ("a", "A", "aB 1", "P.S. ok"))


def test_every_compatible_combination_is_buildable():
  """The rule admits only what the generator can satisfy: all compatible pairs and triples."""
  rng = random.Random(0)
  combos = [c for size in (1, 2, 3) for c in itertools.combinations(ifeval.KIND_IDS, size)
            if ifeval.compatible(c)]
  assert len(combos) > 500
  for kinds in combos:
    record = ifeval.make_record(kinds, rng, "eval" if ifeval.held_out(kinds) else "train")
    assert _kinds(record) == list(kinds)
    assert all(ifeval.check(record, record["output"])), record


def _pattern(template):
  """A regex matching any rendering of a phrasing template inside an instruction."""
  return re.compile(re.sub(r"\\\{\w+\\\}", ".*?", re.escape(template)))


def test_phrasings_and_topics_held_out(splits):
  assert not {t.name for t in ifeval.TOPICS["train"]} & {t.name for t in ifeval.TOPICS["eval"]}
  assert not set(ifeval.TASKS["train"]) & set(ifeval.TASKS["eval"])
  for split, other in (("train", "eval"), ("eval", "train")):
    starts = tuple(t.format(topic=x.name) for t in ifeval.TASKS[split]
                   for x in ifeval.TOPICS[split])
    foreign = [_pattern(t) for t in ifeval.TASKS[other]]
    foreign += [_pattern(t) for cls in ifeval.KINDS.values() for t in getattr(cls, other)]
    own = {k: [_pattern(t) for t in getattr(cls, split)] for k, cls in ifeval.KINDS.items()}
    for r in splits[split]:
      assert r["instruction"].startswith(starts), r["instruction"]
      assert not any(p.search(r["instruction"]) for p in foreign), r["instruction"]
      for kind in _kinds(r):
        assert any(p.search(r["instruction"]) for p in own[kind]), (kind, r["instruction"])


def test_topics_fit_their_constraints():
  for topic in ifeval.TOPICS["train"] + ifeval.TOPICS["eval"]:
    assert len(topic.facts) == 6 and re.search(rf"\b{topic.keyword}\b", topic.name), topic
    assert sum(bool(re.search(rf"(?i)\b{topic.keyword}\b", f)) for f in topic.facts) >= 4, topic
    for fact in topic.facts:
      assert not re.search(r'["\[\]*<>]|\b[A-Z]{2,}\b', fact), fact


def test_combinations_held_out(splits):
  held = {frozenset(p) for p in ifeval.HELD_OUT_PAIRS}
  assert all(ifeval.compatible(p) for p in ifeval.HELD_OUT_PAIRS)
  assert not any(ifeval.held_out(_kinds(r)) for r in splits["train"])
  assert not _pairs(splits["train"]) & held
  assert held <= _pairs(splits["eval"]) - _pairs(splits["train"])
  assert 0.4 < sum(ifeval.held_out(_kinds(r)) for r in splits["eval"]) / 600 < 0.7


def test_score_on_a_hand_made_set():
  records = [
      {"constraints": [{"kind": "case:all_lowercase", "args": {}},
                       {"kind": "punct:no_commas", "args": {}}]},
      {"constraints": [{"kind": "format:title", "args": {}}]},
      {"constraints": [{"kind": "keywords:include", "args": {"words": ["honey"]}},
                       {"kind": "length:max_words", "args": {"n": 3}},
                       {"kind": "start:phrase", "args": {"phrase": "Yes."}}]},
  ]
  responses = [
      "Sure here it is:\nbees make honey.",  # lowercase only once the first line goes
      "<<Bees>>\nBees fly.",  # passes
      "No honey here at all.",  # has honey; 5 words > 3 and no "Yes." however cut
  ]
  assert ifeval.check(records[0], responses[0]) == [False, True]
  assert ifeval.check(records[0], responses[0], loose=True) == [True, True]
  assert ifeval.check(records[2], responses[2], loose=True) == [True, False, False]
  got = ifeval.score(records, responses)
  assert got["n_prompts"] == 3
  assert got["prompt_strict"] == pytest.approx(1 / 3)  # only the title prompt
  assert got["prompt_loose"] == pytest.approx(2 / 3)  # and the lowercase one
  assert got["instruction_strict"] == pytest.approx(3 / 6)  # no_commas, title, include
  assert got["instruction_loose"] == pytest.approx(4 / 6)  # and lowercase
  assert got["per_kind"] == {
      "case:all_lowercase": {"n": 1, "strict": 0.0, "loose": 1.0},
      "format:title": {"n": 1, "strict": 1.0, "loose": 1.0},
      "keywords:include": {"n": 1, "strict": 1.0, "loose": 1.0},
      "length:max_words": {"n": 1, "strict": 0.0, "loose": 0.0},
      "punct:no_commas": {"n": 1, "strict": 1.0, "loose": 1.0},
      "start:phrase": {"n": 1, "strict": 0.0, "loose": 0.0},
  }


def test_score_of_the_built_outputs_and_bad_arguments(splits):
  records = splits["eval"][:50]
  got = ifeval.score(records, [r["output"] for r in records])
  assert got["prompt_strict"] == got["instruction_loose"] == 1.0
  assert ifeval.score(records, [""] * 50)["instruction_loose"] == 0.0
  assert ifeval.score([], [])["n_prompts"] == 0
  with pytest.raises(ValueError, match="2 records but 1"):
    ifeval.score(records[:2], ["x"])
  with pytest.raises(ValueError, match="split 'test'"):
    ifeval.generate(3, 0, "test")
  with pytest.raises(ValueError, match=">= 0"):
    ifeval.generate(-1, 0, "train")
  with pytest.raises(ValueError, match="unknown"):
    ifeval.constraint({"kind": "format:haiku", "args": {}})
