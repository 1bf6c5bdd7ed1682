"""Typed run configuration: nested dataclasses, YAML loading and `section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

# The projections a LoRA adapter can wrap; "all-linear" (as a plain string) means all of them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
NAMED_TEMPLATES = ("alpaca", "reference")
RECORD_FIELDS = ("instruction", "input", "output")


class ConfigError(ValueError):
  """A config file or override that does not fit the schema."""


# A check is (predicate, what the value must be); the text goes into the error message.
Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, ">= 0")
FRACTION: Check = (lambda v: 0 <= v < 1, "in [0, 1)")
PROBABILITY: Check = (lambda v: 0 < v <= 1, "in (0, 1]")


def _field(default, *, choices: tuple | None = None, check: Check | None = None):
  """A dataclass field carrying its allowed values (`choices`) or range (`check`) as metadata."""
  meta = {"choices": choices, "check": check}
  if isinstance(default, (list, dict)):
    return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class ModelSection:
  # "gemma3-270m": the packaged GGUF Gemma 3 270M; "random:<preset>": random weights of a
  # model.PRESETS entry; otherwise a checkpoint file/dir (Flax, HF safetensors, GGUF) or hub id.
  path: str = _field("gemma3-270m")
  dtype: str = _field("float32", choices=("float32", "bfloat16"))
  # "params": matmuls in the parameters' dtype; "bfloat16": matmul inputs rounded to bfloat16
  # with float32 accumulation, everything else (residual stream, norms, softmax) in float32
  matmul: str = _field("params", choices=("params", "bfloat16"))
  remat: bool = _field(False)
  quant: str = _field("none", choices=("none", "int8"))


@dataclasses.dataclass
class LoraSection:
  r: int = _field(8, check=POSITIVE)
  alpha: float = _field(32.0, check=POSITIVE)
  dropout: float = _field(0.05, check=FRACTION)
  # a list drawn from LORA_TARGETS, or the single string "all-linear"
  targets: list[str] | str = _field(["q_proj", "v_proj"])
  rslora: bool = _field(False)  # scale by alpha / sqrt(r) instead of alpha / r
  seed: int = _field(0, check=NON_NEGATIVE)


@dataclasses.dataclass
class DataSection:
  # file(s) in the Alpaca schema, concatenated in order, or "synth" for jax_it/synth.py's set
  path: str | list[str] = _field("synth")
  # record key holding each of instruction / input / output, for files that name them differently
  fields: dict[str, str] = _field({k: k for k in RECORD_FIELDS})
  # "alpaca" (Stanford), "reference" (the reference run's format) or a custom format string
  # with an {instruction} placeholder (and optionally {input})
  template: str = _field("alpaca")
  template_no_input: str | None = _field(None)  # custom template for records without input
  # null: the template decides (response + EOS for alpaca and custom templates; every token and
  # no EOS for reference, as the reference run trained)
  loss_on: str | None = _field(None, choices=("response", "all", None))
  add_eos: bool | None = _field(None)
  max_len: int = _field(1024, check=POSITIVE)
  batch_mode: str = _field("pack", choices=("pack", "pad"))
  truncate: str = _field("truncate", choices=("truncate", "drop"))
  # fractions [train, test, validation] of the concatenated records, taken in that order
  splits: list[float] = _field([0.85, 0.10, 0.05])
  split_shuffle: bool = _field(False)
  seed: int = _field(0, check=NON_NEGATIVE)
  workers: int = _field(0, check=NON_NEGATIVE)
  on_error: str = _field("raise", choices=("raise", "skip"))
  # used only when path is "synth": records per split and the generator's seed
  synth_train: int = _field(2000, check=POSITIVE)
  synth_eval: int = _field(200, check=NON_NEGATIVE)
  synth_seed: int = _field(0, check=NON_NEGATIVE)


@dataclasses.dataclass
class TrainSection:
  batch_size: int = _field(8, check=POSITIVE)  # global, summed over devices and micro-batches
  micro_batches: int = _field(1, check=POSITIVE)  # gradient accumulation steps per update
  epochs: int = _field(1, check=POSITIVE)
  max_steps: int = _field(0, check=NON_NEGATIVE)  # 0: the epochs decide
  lr: float = _field(2e-4, check=POSITIVE)
  warmup_steps: int = _field(0, check=NON_NEGATIVE)
  warmup_ratio: float = _field(0.0, check=FRACTION)  # added: warmup as a fraction of all steps
  schedule: str = _field("linear", choices=("linear", "cosine", "constant"))
  weight_decay: float = _field(0.0, check=NON_NEGATIVE)
  clip_norm: float = _field(1.0, check=NON_NEGATIVE)  # 0: no clipping
  b1: float = _field(0.9, check=FRACTION)
  b2: float = _field(0.999, check=FRACTION)
  eps: float = _field(1e-8, check=POSITIVE)
  seed: int = _field(0, check=NON_NEGATIVE)
  parallel: str = _field("data", choices=("data", "sharded"))
  loss_chunk: int = _field(512, check=POSITIVE)  # tokens per chunk of the cross-entropy
  log_every: int = _field(1, check=POSITIVE)
  eval_every: int = _field(0, check=NON_NEGATIVE)  # 0: only at the last step
  eval_batches: int = _field(0, check=NON_NEGATIVE)  # 0: the whole held-out split


@dataclasses.dataclass
class CheckpointSection:
  every: int = _field(0, check=NON_NEGATIVE)  # steps; 0: only at the end
  keep: int = _field(3, check=POSITIVE)
  async_save: bool = _field(True)


@dataclasses.dataclass
class GenerateSection:
  max_new_tokens: int = _field(128, check=POSITIVE)
  temperature: float = _field(0.0, check=NON_NEGATIVE)  # 0: greedy
  top_k: int = _field(0, check=NON_NEGATIVE)  # 0: no top-k filter
  top_p: float = _field(1.0, check=PROBABILITY)
  seed: int = _field(0, check=NON_NEGATIVE)


@dataclasses.dataclass
class ReportSection:
  eval_samples: int = _field(20, check=NON_NEGATIVE)  # held-out records generated before/after
  show: int = _field(3, check=NON_NEGATIVE)  # of those, how many are printed in full


@dataclasses.dataclass
class RunConfig:
  model: ModelSection = dataclasses.field(default_factory=ModelSection)
  lora: LoraSection = dataclasses.field(default_factory=LoraSection)
  data: DataSection = dataclasses.field(default_factory=DataSection)
  train: TrainSection = dataclasses.field(default_factory=TrainSection)
  checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
  generate: GenerateSection = dataclasses.field(default_factory=GenerateSection)
  report: ReportSection = dataclasses.field(default_factory=ReportSection)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}


def lora_targets(section: LoraSection) -> tuple[str, ...]:
  """The projection names the adapter wraps, with "all-linear" expanded."""
  return LORA_TARGETS if section.targets == ALL_LINEAR else tuple(section.targets)


# ---------------------------------------------------------------------------------------------
# Type checking of single values


def _type_name(tp) -> str:
  return tp.__name__ if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp) -> Any:
  """`value` converted to the annotation `tp`, or TypeError; only lossless conversions."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    for arm in args:
      try:
        return _coerce(value, arm)
      except TypeError:
        pass
    raise TypeError
  if tp is type(None):
    if value is None:
      return None
    raise TypeError
  if origin is list:
    if not isinstance(value, list):
      raise TypeError
    return [_coerce(v, args[0]) for v in value]
  if origin is dict:
    if not isinstance(value, dict):
      raise TypeError
    return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
  if tp is float:
    # PyYAML reads 5e-5 (no dot) as a string, so numeric strings are accepted for floats.
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
      return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      return float(value)
    raise TypeError
  if tp is int and isinstance(value, bool):
    raise TypeError
  if isinstance(value, tp):
    return value
  raise TypeError


def _field_error(where: str, key: str, value: Any, expected: str) -> ConfigError:
  return ConfigError(f"{where}: {key}={value!r} is invalid; expected {expected}")


def _check_value(f: dataclasses.Field, tp, value: Any, key: str, where: str) -> Any:
  """`value` type-checked and range-checked against field `f`."""
  try:
    value = _coerce(value, tp)
  except TypeError:
    raise _field_error(where, key, value, _type_name(tp)) from None
  choices, check = f.metadata.get("choices"), f.metadata.get("check")
  if choices is not None and value not in choices:
    raise _field_error(where, key, value, "one of " + ", ".join(map(str, choices)))
  if check is not None and not check[0](value):
    raise _field_error(where, key, value, "a value " + check[1])
  return value


def _fields(section_type: type) -> dict[str, tuple[dataclasses.Field, Any]]:
  hints = typing.get_type_hints(section_type)
  return {f.name: (f, hints[f.name]) for f in dataclasses.fields(section_type)}


def _unknown_key(where: str, key: str, section: str, valid) -> ConfigError:
  return ConfigError(f"{where}: unknown key {key!r} in section {section!r}; "
                     f"valid keys: {', '.join(valid)}")


def _unknown_section(where: str, name: str) -> ConfigError:
  return ConfigError(f"{where}: unknown section {name!r}; valid sections: {', '.join(SECTIONS)}")


# ---------------------------------------------------------------------------------------------
# Building, overriding and validating


def from_dict(raw: dict | None, where: str = "config") -> RunConfig:
  """A RunConfig from nested plain data (as read from YAML), each value checked; no `validate`.

  `where` names the source in error messages.
  """
  raw = {} if raw is None else raw
  if not isinstance(raw, dict):
    raise ConfigError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
  sections = {}
  for name, values in raw.items():
    if name not in SECTIONS:
      raise _unknown_section(where, name)
    values = {} if values is None else values
    if not isinstance(values, dict):
      raise ConfigError(f"{where}: section {name!r} must be a mapping, got {values!r}")
    sections[name] = _section_from_dict(name, values, where)
  return RunConfig(**sections)


def _section_from_dict(name: str, values: dict, where: str):
  fields = _fields(SECTIONS[name])
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      raise _unknown_key(where, key, name, fields)
    f, tp = fields[key]
    kwargs[key] = _check_value(f, tp, value, f"{name}.{key}", where)
  return SECTIONS[name](**kwargs)


def _parse_override_value(text: str, tp) -> Any:
  """A YAML scalar/list; text that YAML cannot read, or reads as a non-string, stays a string
  where the field accepts one (so templates and paths need no quoting)."""
  try:
    value = yaml.safe_load(text)
  except yaml.YAMLError:
    return text
  try:
    _coerce(value, tp)
    return value
  except TypeError:
    return text


def apply_override(cfg: RunConfig, override: str) -> RunConfig:
  """A copy of `cfg` with one `section.key=value` (or `data.fields.output=answer`) applied.

  Checks the value alone; `validate` checks how values fit together, once all are applied.
  """
  where = f"override {override!r}"
  key, sep, text = override.partition("=")
  parts = key.strip().split(".")
  if not sep or len(parts) < 2 or not all(parts):
    raise ConfigError(f"{where}: expected section.key=value")
  name, field_name, rest = parts[0], parts[1], parts[2:]
  if name not in SECTIONS:
    raise _unknown_section(where, name)
  fields = _fields(SECTIONS[name])
  if field_name not in fields:
    raise _unknown_key(where, field_name, name, fields)
  f, tp = fields[field_name]
  section = getattr(cfg, name)
  if rest:  # one level into a mapping field, e.g. data.fields.output
    value = _override_in_mapping(section, field_name, rest, text, where)
  else:
    value = _parse_override_value(text, tp)
  value = _check_value(f, tp, value, f"{name}.{field_name}", where)
  return dataclasses.replace(cfg, **{name: dataclasses.replace(section, **{field_name: value})})


def _override_in_mapping(section, field_name: str, rest: list[str], text: str, where: str):
  current = getattr(section, field_name)
  if not isinstance(current, dict) or len(rest) != 1:
    raise ConfigError(f"{where}: {field_name!r} has no sub-keys")
  return {**current, rest[0]: text}


def validate(cfg: RunConfig, where: str = "config") -> None:
  """Checks that span more than one value; raises ConfigError."""
  for check in (_check_targets, _check_fields, _check_templates, _check_splits, _check_batch):
    check(cfg, where)


def _check_targets(cfg: RunConfig, where: str) -> None:
  targets = cfg.lora.targets
  if isinstance(targets, str):
    if targets != ALL_LINEAR:
      raise _field_error(where, "lora.targets", targets,
                         f"{ALL_LINEAR!r} or a list drawn from {', '.join(LORA_TARGETS)}")
    return
  bad = [t for t in targets if t not in LORA_TARGETS]
  if bad or not targets or len(set(targets)) != len(targets):
    raise _field_error(where, "lora.targets", targets,
                       f"a non-empty list of distinct names from {', '.join(LORA_TARGETS)}, "
                       f"or {ALL_LINEAR!r}")


def _check_fields(cfg: RunConfig, where: str) -> None:
  keys = set(cfg.data.fields)
  if keys != set(RECORD_FIELDS):
    raise _field_error(where, "data.fields", cfg.data.fields,
                       f"a mapping with exactly the keys {', '.join(RECORD_FIELDS)}")


def _check_templates(cfg: RunConfig, where: str) -> None:
  for key in ("template", "template_no_input"):
    text = getattr(cfg.data, key)
    if text is not None and text not in NAMED_TEMPLATES and "{instruction}" not in text:
      raise _field_error(where, f"data.{key}", text,
                         f"one of {', '.join(NAMED_TEMPLATES)} or a format string with "
                         "an {instruction} placeholder")


def _check_splits(cfg: RunConfig, where: str) -> None:
  splits = cfg.data.splits
  if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1) > 1e-6:
    raise _field_error(where, "data.splits", splits,
                       "three fractions [train, test, validation] >= 0 that sum to 1")
  paths = [cfg.data.path] if isinstance(cfg.data.path, str) else cfg.data.path
  if not paths or not all(p.strip() for p in paths):
    raise _field_error(where, "data.path", cfg.data.path, "a non-empty path or list of paths")


def _check_batch(cfg: RunConfig, where: str) -> None:
  t = cfg.train
  if t.batch_size % t.micro_batches:
    raise _field_error(where, "train.micro_batches", t.micro_batches,
                       f"a divisor of train.batch_size={t.batch_size}")


# ---------------------------------------------------------------------------------------------
# Files


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
  """The config in YAML file `path` (None: the defaults) with `overrides` applied in order."""
  raw = None
  if path is not None:
    p = Path(path)
    if not p.is_file():
      raise ConfigError(f"config file not found: {path}")
    try:
      raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
      raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
  where = str(path) if path is not None else "defaults"
  cfg = from_dict(raw, where)
  for override in overrides:
    cfg = apply_override(cfg, override)
  validate(cfg, f"{where} with overrides {' '.join(overrides)}" if overrides else where)
  return cfg


def to_dict(cfg: RunConfig) -> dict:
  """Nested plain data (dicts, lists, scalars), as YAML would hold it."""
  return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str) -> None:
  """Writes `cfg` as YAML that `load_config` reads back to an equal config."""
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
