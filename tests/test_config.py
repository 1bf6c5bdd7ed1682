"""Tests for jax_it.config: shipped YAMLs, overrides, and one-line errors naming key and options."""

from pathlib import Path

import pytest

from jax_it import config, lora, schema

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def _error(path=None, overrides=()) -> str:
  with pytest.raises(config.ConfigError) as info:
    config.load_config(path, list(overrides))
  message = str(info.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
  cfg = config.load_config(str(path), [])
  assert path.read_text().startswith("#"), "each config starts with a comment saying what it is for"
  config.save_config(cfg, str(tmp_path / "saved.yaml"))
  assert config.load_config(str(tmp_path / "saved.yaml"), []) == cfg


def test_shipped_config_set_and_key_values():
  assert {p.name for p in CONFIGS} >= {"default.yaml", "tiny.yaml", "gemma2_2b_alpaca.yaml",
                                       "gemma2_2b_alpaca_improved.yaml"}
  ref = config.load_config(str(CONFIGS[0].parent / "gemma2_2b_alpaca.yaml"), [])
  assert (ref.lora.r, ref.lora.alpha, ref.lora.targets) == (8, 32.0, ("q_proj", "v_proj"))
  assert (ref.train.lr, ref.train.warmup_steps, ref.train.weight_decay) == (5e-5, 500, 0.01)
  assert (ref.data.template, ref.data.loss_on, ref.data.add_eos) == ("reference", "all", False)
  tiny = config.load_config(str(CONFIGS[0].parent / "tiny.yaml"), [])
  assert tiny.model.path == "random:gemma2-tiny" and tiny.data.path == "synth"


def test_defaults_without_file():
  cfg = config.load_config(None, [])
  assert cfg == config.RunConfig()
  assert (cfg.model.path, cfg.lora.r, cfg.train.batch_size, cfg.data.max_len) == (
      "gemma3-270m", 8, 8, 1024)


def test_overrides_nested_list_and_types():
  cfg = config.load_config(None, [
      "lora.targets=[q_proj,k_proj]", "train.lr=5e-5", "lora.alpha=16", "model.remat=true",
      "data.path=[a.json, b.json]", "model.path=123", "data.fields.output=answer",
      "data.template_no_input=null", "train.micro_batches=4"])
  assert cfg.lora.targets == ("q_proj", "k_proj")
  assert cfg.train.lr == 5e-5 and isinstance(cfg.train.lr, float)
  assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)  # int for float is fine
  assert cfg.model.remat is True
  assert cfg.data.path == ("a.json", "b.json")
  assert cfg.model.path == "123"  # a string field keeps the text as written
  assert cfg.data.fields == {"instruction": "instruction", "input": "input", "output": "answer"}
  assert cfg.data.template_no_input is None
  assert config.load_config(None, ["lora.targets=all-linear"]).lora.targets == lora.ALL_LINEAR


def test_overrides_apply_in_order_and_validate_at_the_end():
  # batch 12 over 3 micro-batches is valid only once both overrides are in
  cfg = config.load_config(None, ["train.micro_batches=3", "train.batch_size=12"])
  assert (cfg.train.batch_size, cfg.train.micro_batches) == (12, 3)
  assert config.load_config(None, ["train.lr=1", "train.lr=0.5"]).train.lr == 0.5


@pytest.mark.parametrize("override, expected", [
    ("train.lr=abc", "train.lr='abc'"),
    ("lora.r=1.5", "lora.r="),
    ("model.remat=1", "model.remat="),
    ("lora.targets=q_proj", "lora.targets="),
    ("train.batch_size=[1]", "train.batch_size="),
])
def test_override_type_errors(override, expected):
  message = _error(overrides=[override])
  assert expected in message and "expected" in message and override in message


def test_unknown_key_lists_valid_keys(tmp_path):
  message = _error(overrides=["lora.rank=4"])
  assert "'rank'" in message and "r, alpha, dropout, targets, rslora, seed" in message
  path = tmp_path / "bad.yaml"
  path.write_text("train:\n  learning_rate: 0.1\n")
  message = _error(str(path))
  assert str(path) in message and "'learning_rate'" in message
  assert "batch_size" in message and "lr" in message and "eval_batches" in message


def test_unknown_section_lists_sections(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("optimizer:\n  lr: 0.1\n")
  message = _error(str(path))
  assert "'optimizer'" in message and "model, lora, data, train" in message


@pytest.mark.parametrize("override, allowed", [
    ("model.dtype=float16", "float32, bfloat16"),
    ("train.schedule=step", "linear, cosine, constant"),
    ("data.batch_mode=stream", "pack, pad"),
    ("lora.targets=[q_proj,qkv]", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
])
def test_bad_enum_value_lists_allowed(override, allowed):
  message = _error(overrides=[override])
  assert allowed in message and override.split("=")[0] in message


@pytest.mark.parametrize("override, expected", [
    ("lora.r=0", "> 0"),
    ("train.lr=-1e-4", "> 0"),
    ("train.warmup_steps=-1", ">= 0"),
    ("lora.dropout=1.0", "[0, 1)"),
    ("generate.top_p=0", "(0, 1]"),
    ("train.micro_batches=3", "divisor of train.batch_size=8"),
    ("data.splits=[0.5,0.6,0.1]", "sum to 1"),
    ("data.template=Q: {question}", "{instruction}"),
    ("data.fields={instruction: q}", "instruction, input, output"),
])
def test_bad_values(override, expected):
  assert expected in _error(overrides=[override])


def test_bad_yaml_file_value_names_file_and_key(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("model:\n  quant: int4\n")
  message = _error(str(path))
  assert str(path) in message and "model.quant" in message and "none, int8" in message


def test_missing_file_and_malformed_override(tmp_path):
  missing = str(tmp_path / "nope.yaml")
  message = _error(missing)
  assert "not found" in message and missing in message
  assert "section.key=value" in _error(overrides=["train.lr"])
  assert "section.key=value" in _error(overrides=["lr=0.1"])


def test_non_mapping_yaml(tmp_path):
  path = tmp_path / "list.yaml"
  path.write_text("- 1\n- 2\n")
  assert "mapping" in _error(str(path))
  path.write_text("train: 3\n")
  assert "'train'" in _error(str(path))


# ---------------------------------------------------------------------------------------------
# Every key reaches the code that uses it

ROOT = Path(__file__).parents[1]
# Reads that do not use a value: validation, the checkpoint identity, the methods dataclasses
# generates (their file is "<string>"), (de)serialisation in config.py and schema.py.
_NOT_USES = {"__post_init__", "check", "identity"}
_NOT_USE_FILES = ("<string>", "config.py", "schema.py", "dataclasses.py", "copy.py")


def _spy_on_reads(monkeypatch) -> set[str]:
  """Record `section.key` whenever library or run code reads a config key."""
  import sys

  read = set()
  for name, cls in config.SECTIONS.items():
    keys = set(schema.keys(cls))
    original = cls.__getattribute__

    def spy(self, attr, _original=original, _keys=keys, _name=name):
      code = sys._getframe(1).f_code
      if (attr in _keys and code.co_name not in _NOT_USES
          and not code.co_filename.endswith(_NOT_USE_FILES)):
        read.add(f"{_name}.{attr}")
      return _original(self, attr)

    monkeypatch.setattr(cls, "__getattribute__", spy)
  return read


def test_every_config_key_reaches_the_code_that_uses_it(tmp_path, monkeypatch):
  """Two short in-process runs of `run.py train` (the synthetic set; then a data file, epochs and
  a warmup ratio) read every key of every section: none is declared and then ignored."""
  import json
  import sys

  sys.path.insert(0, str(ROOT))
  import run

  read = _spy_on_reads(monkeypatch)
  tiny = str(ROOT / "configs" / "tiny.yaml")
  common = ["--no-progress", "train.eval_every=1", "report.eval_samples=1"]
  assert run.main(["--config", tiny, "--run-dir", str(tmp_path / "a"), "train.max_steps=2",
                   *common]) == 0
  records = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w}
             for w in ("red", "blue", "green", "gold", "gray", "pink", "teal", "tan", "jade",
                       "lime", "navy", "plum")]
  (tmp_path / "records.json").write_text(json.dumps(records))
  assert run.main(["--config", tiny, "--run-dir", str(tmp_path / "b"), "train.max_steps=0",
                   "train.warmup_steps=0", "train.warmup_ratio=0.5", "data.batch_mode=pad",
                   f"data.path={tmp_path / 'records.json'}", "data.split_shuffle=true",
                   *common]) == 0
  declared = {f"{n}.{k}" for n, cls in config.SECTIONS.items() for k in schema.keys(cls)}
  assert declared - read == set()
