"""Gemma's chat format: token parity with transformers' apply_chat_template, loss masks on model
turns, conversation records and their errors, packing of conversations."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from jax_it import data, templates
from jax_it.sources import DataError, read_records

PIECES = (
    "What is 2 + 2?", "Name three colours.", "Write a haiku about rain.", "ok", "4",
    "Sure! Here is a list:\n- red\n- green\n- blue", "  padded with spaces  ",
    "\n\nleading newlines", "trailing newlines\n\n", "Ünïcödé: naïve café, Straße, Ærø",
    "中文：你好，世界。", "日本語のテキスト", "emoji 🎉🚀 and ✓ marks",
    "code:\n```python\ndef f(x):\n    return x * 2\n```", "tabs\tand\tmore",
    "A sentence with <angle> brackets and {braces} and $dollars$.", "Ελληνικά και Русский текст",
    "multi\n\nparagraph\n\ntext", "1. first\n2. second\n3. third", "x" * 3, "\"quoted\" 'text'",
    "#heading\n**bold** _italic_", "URL: https://example.com/a?b=c&d=e", "- dash start",
    "*star start",
)
SYSTEMS = ("You are a helpful assistant.", "Answer in one word.", "Réponds en français. ",
           "Be concise.\nNo lists.")


def conversations(n: int, seed: int = 0) -> list[dict]:
  """Multi-turn conversations (1-4 exchanges), a third with a system turn, some very long,
  some ending with a user turn; the last ones are instruction records (with and without input)."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if i % 3 == 0 else []
    for _ in range(rng.randint(1, 4)):
      msgs.append({"role": "user", "content": rng.choice(PIECES)})
      reply = " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3)))
      if i % 17 == 0:
        reply = (reply + " ") * 60  # long: thousands of tokens
      msgs.append({"role": "assistant", "content": reply})
    if i % 11 == 5:
      msgs.append({"role": "user", "content": rng.choice(PIECES)})
    out.append({"messages": msgs})
  out += [{"instruction": "Translate to German.", "input": "Good morning",
           "output": "Guten Morgen"},
          {"instruction": "Name a prime number.", "input": "", "output": "7"}]
  return out


def full_ids(example: dict) -> list[int]:
  return example["tokens"].tolist() + example["targets"][-1:].tolist()


@pytest.fixture(scope="module")
def hf_tok(gemma_tokenizer):
  """The Gemma tokenizer with Gemma's published chat template (the GGUF carries none)."""
  import copy
  tok = copy.copy(gemma_tokenizer)
  tok.chat_template = templates.GEMMA_CHAT_TEMPLATE
  return tok


def test_token_ids_equal_apply_chat_template(hf_tok):
  records = conversations(120)
  assert len(records) >= 100
  for i, rec in enumerate(records):
    messages = templates.as_messages(rec)
    ours = full_ids(templates.tokenize_segments(templates.render(rec, "gemma"), hf_tok,
                                                add_eos=False))
    theirs = hf_tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ours == theirs, (i, messages)
    assert ours.count(hf_tok.bos_token_id) == 1 and ours[0] == hf_tok.bos_token_id
    # the prompt generation feeds: every turn before the last model turn + "<start_of_turn>model\n"
    before, _ = templates.split_last_reply(rec)
    prompt, _ = templates.format_prompt(rec, "gemma")
    ours = [hf_tok.bos_token_id] + hf_tok.encode(prompt, add_special_tokens=False)
    theirs = hf_tok.apply_chat_template(before, tokenize=True,
                                        add_generation_prompt=True)["input_ids"]
    assert ours == theirs, (i, before)


def _trained_text(tok, example) -> str:
  ids = example["targets"][example["loss_mask"] > 0]
  return tok.decode(ids, skip_special_tokens=False)


def test_loss_on_every_model_turn_with_its_terminator(hf_tok):
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}]
  segs = templates.render({"messages": msgs}, "gemma")
  ex = {on: templates.tokenize_segments(segs, hf_tok, add_eos=False, loss_on=on)
        for on in ("assistant", "last", "all")}
  assert _trained_text(hf_tok, ex["assistant"]) == "Hello!<end_of_turn>4<end_of_turn>"
  assert _trained_text(hf_tok, ex["last"]) == "4<end_of_turn>"
  assert ex["all"]["loss_mask"].all()
  end = hf_tok.convert_tokens_to_ids("<end_of_turn>")
  assert (ex["assistant"]["targets"][ex["assistant"]["loss_mask"] > 0] == end).sum() == 2
  # the default of the gemma template is every model turn, no EOS appended
  cfg = data.DataConfig(path="unused", template="gemma")
  assert data.loss_settings(cfg) == (False, "assistant")


def test_a_tokenizer_template_other_than_gemmas_is_named(hf_tok, gemma_tokenizer):
  import copy
  assert templates.differs_from_tokenizer(hf_tok) is None
  assert templates.differs_from_tokenizer(gemma_tokenizer) is None  # the GGUF carries none
  other = copy.copy(gemma_tokenizer)
  other.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + "
                         "m['content'] + '\n' }}{% endfor %}")
  message = templates.differs_from_tokenizer(other)
  assert "user: Hi" in message and "<start_of_turn>user" in message


def test_stop_ids_come_from_the_tokenizer(hf_tok):
  ids = templates.stop_ids("gemma", hf_tok)
  assert ids == (hf_tok.eos_token_id, hf_tok.convert_tokens_to_ids("<end_of_turn>"))
  assert templates.stop_ids("alpaca", hf_tok) == (hf_tok.eos_token_id,)


def _write(tmp_path, name, records, jsonl=False):
  p = tmp_path / name
  p.write_text("\n".join(map(json.dumps, records)) if jsonl else json.dumps(records))
  return str(p)


def test_messages_and_sharegpt_files_read_alike(tmp_path):
  msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "model", "content": "M"}]
  share = [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
           {"from": "gpt", "value": "M"}]
  a = read_records(_write(tmp_path, "a.jsonl", [{"messages": msgs}], jsonl=True))
  b = read_records(_write(tmp_path, "b.json", [{"conversations": share}]))
  c = read_records(_write(tmp_path, "c.json", [{"conversations": share}]), format="sharegpt")
  parts = [{"role": "user", "content": [{"type": "text", "text": " U "}]},
           {"role": "assistant", "content": "M"}]
  d = read_records(_write(tmp_path, "d.json", [{"messages": parts}]))
  want = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "assistant", "content": "M"}]
  assert a == b == c == [{"messages": want}]
  assert d == [{"messages": want[1:]}]


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}], "no model (assistant) turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
      {"role": "assistant", "content": "c"}], "messages[1].role: two user turns in a row"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
     "messages[1].role: unknown role 'robot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}],
     "messages[1].content: empty content"),
    ([{"role": "assistant", "content": "a"}], "must start with a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "system", "content": "c"}], "a system turn after the first turn"),
    ([{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "b"}],
     "only text parts are supported"),
])
def test_bad_conversations_name_file_record_and_key(tmp_path, messages, message):
  good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
  path = _write(tmp_path, "bad.json", [good, {"messages": messages}])
  with pytest.raises(DataError, match=f"bad.json: record 1: .*{message}".replace("[", r"\[")
                     .replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
    read_records(path)
  from jax_it.sources import DataStats
  stats = DataStats()
  assert read_records(path, on_error="skip", stats=stats) == [good]
  assert len(stats.skipped) == 1 and message in stats.skipped[0]


def test_format_mismatches_are_one_line_errors(tmp_path):
  conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
  path = _write(tmp_path, "chats.json", [conv])
  with pytest.raises(DataError, match=r"chats.json: record 0: missing key 'instruction'.*"
                     r"conversation \(messages format\); set data.format=messages"):
    read_records(path, format="alpaca")
  alpaca = _write(tmp_path, "alpaca.json", [{"instruction": "i", "output": "o"}])
  with pytest.raises(DataError, match=r"alpaca.json: record 0: missing key 'messages'.*"
                     "Alpaca record"):
    read_records(alpaca, format="messages")
  cfg = data.DataConfig(path=path, splits=(1, 0, 0))  # template alpaca, conversation records
  with pytest.raises(DataError, match=r"chats.json: record 0: .*set data.template=gemma"):
    data.summarize(data.load_records(cfg), None, cfg, 2)


def test_packed_conversations_never_attend_across(tmp_path, hf_tok):
  records = conversations(40, seed=3)[:40]
  cfg = data.DataConfig(path=_write(tmp_path, "c.json", records), template="gemma", max_len=512,
                        splits=(1, 0, 0), pack_bins=8)
  stats = data.DataStats()
  batches = list(data.train_dataset(data.load_records(cfg), hf_tok, cfg, 4, num_epochs=1,
                                    stats=stats, process_index=0, process_count=1))
  seen = set()
  for b in batches:
    for row in range(4):
      seg, rid = b["segment_ids"][row], b["record_ids"][row]
      for s in set(seg[seg > 0].tolist()):
        ids = set(rid[seg == s].tolist())
        assert len(ids) == 1  # one conversation per segment: attention never crosses them
        seen |= ids
      # every trained target is a model turn's token: never a turn header or separator
      start = hf_tok.convert_tokens_to_ids("<start_of_turn>")
      assert not np.any((b["loss_mask"][row] > 0) & (b["targets"][row] == start))
  kept = 40 - len(stats.dropped) - len(stats.no_loss)
  assert len(seen) == kept and len(stats.truncated) > 0  # the long ones were cut at 512
