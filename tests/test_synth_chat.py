"""Tests for jax_it.synth_chat: determinism, schema, held-out phrasings, answers needing history."""

import collections
import re

import pytest

from jax_it import sources, synth, synth_chat


@pytest.fixture(scope="module")
def splits():
  return {split: synth_chat.generate(2000, seed=0, split=split) for split in synth_chat.SPLITS}


def _users(record):
  return [m["content"] for m in record["messages"] if m["role"] == "user"]


def _assistants(record):
  return [m["content"] for m in record["messages"] if m["role"] == "assistant"]


def _by_family(records):
  out = collections.defaultdict(list)
  for r in records:
    out[r["family"]].append(r)
  return out


def test_deterministic_and_seed_dependent():
  assert synth_chat.generate(200, 7, "train") == synth_chat.generate(200, 7, "train")
  assert synth_chat.generate(200, 7, "train") != synth_chat.generate(200, 8, "train")
  assert synth_chat.generate(0, 0, "eval") == []


def test_schema_and_families(splits):
  assert len(synth_chat.FAMILY_NAMES) >= 8
  assert len(set(synth_chat.FAMILY_NAMES)) == len(synth_chat.FAMILIES)
  for records in splits.values():
    counts = collections.Counter(r["family"] for r in records)
    assert set(counts) == set(synth_chat.FAMILY_NAMES)
    assert max(counts.values()) - min(counts.values()) <= 1
    for r in records:
      assert set(r) == {"messages", "family"}
      messages = r["messages"]
      first = 1 if messages[0]["role"] == "system" else 0
      roles = [m["role"] for m in messages[first:]]
      assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) in (4, 6), r
      for m in messages:
        assert set(m) == {"role", "content"} and isinstance(m["content"], str), r
        assert m["content"].strip() and "{" not in m["content"], r
      assert sources.validate_conversation(r, "messages", "synth_chat") == {"messages": messages}


def test_system_messages_and_turn_counts(splits):
  for records in splits.values():
    systems = [r["messages"][0]["content"] for r in records if r["messages"][0]["role"] == "system"]
    assert 0.2 <= len(systems) / len(records) <= 0.3
    assert set(systems) == set(synth_chat.SYSTEM_PROMPTS)
    for name, rs in _by_family(records).items():
      assert {len(_users(r)) for r in rs} == {2, 3}, name


def test_phrasings_vary_and_are_held_out():
  for family in synth_chat.FAMILIES:
    for key, turn in family.turns.items():
      assert len(turn.train) >= 3 and len(turn.eval) >= 2, (family.name, key)
      assert not set(turn.train) & set(turn.eval), (family.name, key)
    assert not set(family.train) & set(family.eval), family.name


def _pattern(template):
  """A regex matching every rendering of a user-turn template."""
  return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)), re.DOTALL)


def test_splits_do_not_overlap(splits):
  train_patterns = [_pattern(t) for f in synth_chat.FAMILIES for t in f.train]
  own = {f.name: {s: [_pattern(t) for t in getattr(f, s)] for s in synth_chat.SPLITS}
         for f in synth_chat.FAMILIES}
  for split, records in splits.items():
    for r in records[:300]:
      for text in _users(r):
        assert any(p.fullmatch(text) for p in own[r["family"]][split]), (split, text)
  # no eval user turn reads as an instance of any training phrasing, of any family
  for r in splits["eval"]:
    for text in _users(r):
      assert not any(p.fullmatch(text) for p in train_patterns), text
  train_texts = {t for r in splits["train"] for t in _users(r)}
  assert not train_texts & {t for r in splits["eval"] for t in _users(r)}


def test_answers_short_and_numbers_small(splits):
  for r in splits["train"] + splits["eval"]:
    assert all(len(a.split()) <= 6 for a in _assistants(r)), r
    text = " ".join(m["content"] for m in r["messages"])
    assert all(int(n) < 100 for n in re.findall(r"\d+", text)), r


# ---------------------------------------------------------------------------------------------
# Independent solvers: every assistant turn of a conversation from its user turns alone


def _ints(text):
  return [int(n) for n in re.findall(r"\d+", text)]


def _tokens(text, pool):
  return [w for w in re.findall(r"[A-Za-z]+", text) if w in pool]


def _solve_running_sum(users):
  total, out = 0, []
  for text in users:
    total += sum(_ints(text))
    out.append(str(total))
  return out


def _solve_times_result(users):
  a, b = _ints(users[0])
  if re.search(r"^Subtract|away from", users[0]):  # "subtract b from a": the numbers swap places
    a, b = b, a
  value, out = a - b, [str(a - b)]
  for text in users[1:]:
    (n,) = _ints(text)
    value = value * n if re.search(r"multipl|times", text, re.I) else value - n
    out.append(str(value))
  return out


def _solve_recall_word(users):
  (word,) = _tokens(users[0], synth.WORDS)
  out = ["OK"]
  for text in users[1:-1]:
    out.append("odd" if _ints(text)[0] % 2 else "even")
  return out + [word]


def _is_upper_request(text):
  return re.search(r"upper|caps|capital", text, re.I) is not None


def _solve_sort_then(users):
  words = sorted(users[0].split(": ", 1)[1].split(", "))
  out = [", ".join(words)]
  for text in users[1:]:
    words = [w.upper() for w in words] if _is_upper_request(text) else words[::-1]
    out.append(", ".join(words))
  return out


def _solve_filter_count(users):
  pool = synth.ANIMALS if "animals" in users[0] else synth.COLORS
  kept = _tokens(users[0], pool)
  out = [", ".join(kept)]
  for text in users[1:]:
    if re.search(r"how many|count|length", text, re.I):
      out.append(str(len(kept)))
    else:
      kept = sorted(kept)
      out.append(", ".join(kept))
  return out


def _solve_recall_number(users):
  nums = _ints(users[0])
  out = []
  for text in users:
    if "largest" in text:
      out.append(str(max(nums)))
    elif "smallest" in text:
      out.append(str(min(nums)))
    else:
      out.append(str(nums[0] if re.search(r"\bfirst\b", text) else nums[-1]))
  return out


def _solve_opposite_upper(users):
  word = _tokens(users[0], synth.OPPOSITE)[-1]
  out = []
  for i, text in enumerate(users):
    if i == 0 or re.search(r"opposite|antonym", text):
      word = synth.OPPOSITE[word]
    else:
      assert _is_upper_request(text), text
      word = word.upper()
    out.append(word)
  return out


def _solve_ages(users):
  ages, out = {}, []
  for text in users:
    (name,) = _tokens(text, synth.NAMES) or [None]
    if _ints(text):
      ages[name] = _ints(text)[0]
      out.append("OK")
    elif name is not None:
      out.append(str(ages[name]))
    else:
      out.append(max(ages, key=ages.get))
  return out


def _solve_list_edit(users):
  items = _tokens(users[0], synth.ANIMALS)
  out = [", ".join(items)]
  for text in users[1:]:
    (item,) = _tokens(text, synth.ANIMALS)
    if text.split()[0] in ("Add", "Put", "Append", "Also", "Extend"):
      items = items + [item]
    else:
      assert text.split()[0] in ("Remove", "Take", "Delete", "Drop", "Cross"), text
      items = [w for w in items if w != item]
    out.append(", ".join(items))
  return out


def _solve_sequence_more(users):
  seq = _ints(users[0])
  step = seq[1] - seq[0]
  return [str(seq[-1] + i * step) for i in range(1, len(users) + 1)]


SOLVERS = {
    "running_sum": _solve_running_sum, "times_result": _solve_times_result,
    "recall_word": _solve_recall_word, "sort_then": _solve_sort_then,
    "filter_count": _solve_filter_count, "recall_number": _solve_recall_number,
    "opposite_upper": _solve_opposite_upper, "ages": _solve_ages,
    "list_edit": _solve_list_edit, "sequence_more": _solve_sequence_more,
}


def test_every_turn_answer_is_correct(splits):
  assert set(SOLVERS) == set(synth_chat.FAMILY_NAMES)
  for r in splits["train"] + splits["eval"]:
    assert SOLVERS[r["family"]](_users(r)) == _assistants(r), r


def test_same_last_question_other_history_other_answer(splits):
  """The graded answer is no function of the last user turn: the same last question, asked after
  another record's earlier turns, has another answer (by the solvers and in generated data)."""
  for records in splits.values():
    for name, rs in _by_family(records).items():
      solve, changed, tried = SOLVERS[name], 0, 0
      for i, r in enumerate(rs[:60]):
        for other in rs[i + 1:]:
          try:
            new = solve(_users(other)[:-1] + _users(r)[-1:])[-1]
          except (KeyError, ValueError, IndexError):  # e.g. asks the age of someone not named
            continue
          tried += 1
          changed += new != synth_chat.answer(r)
          break
      assert tried >= 40 and changed / tried > 0.6, (name, changed, tried)
      # and in the data itself: most last questions come with several graded answers
      answers = collections.defaultdict(set)
      for r in rs:
        answers[_users(r)[-1]].add(synth_chat.answer(r))
      shared = sum(len(answers[_users(r)[-1]]) > 1 for r in rs)
      assert shared / len(rs) > 0.6, (name, shared, len(rs))


def test_answer_prompt_and_correctness(splits):
  for r in splits["train"] + splits["eval"]:
    prompt, graded = synth_chat.prompt_messages(r), synth_chat.answer(r)
    assert prompt + [{"role": "assistant", "content": graded}] == r["messages"]
    assert prompt[-1]["role"] == "user" and graded == _assistants(r)[-1]
    assert synth_chat.is_correct(r, graded)
    assert synth_chat.is_correct(r, f"  {graded}\n")
    assert not synth_chat.is_correct(r, graded + ".")
    assert not synth_chat.is_correct(r, graded + " x")
    assert not synth_chat.is_correct(r, "")
    if _assistants(r)[-2] != graded:  # the earlier turn's answer is not the graded one
      assert not synth_chat.is_correct(r, _assistants(r)[-2])


def test_bad_arguments():
  with pytest.raises(ValueError, match="split 'test'"):
    synth_chat.generate(3, 0, "test")
  with pytest.raises(ValueError, match=">= 0"):
    synth_chat.generate(-1, 0, "train")
