"""The run config: the library's own option dataclasses as sections, YAML loading, overrides.

Every key is declared once. `lora`, `data`, `train` and `generate` are the library's dataclasses
(lora.LoraConfig, data.DataConfig, train.TrainConfig, sample.SampleSpec); `model`, `checkpoint`
and `report` have no library twin and are declared here. Each section checks itself when it is
built (schema.validate), so a YAML file, an override and a Python call get the same rules.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import yaml

from jax_it import schema
from jax_it.data import DataConfig
from jax_it.lora import LoraConfig
from jax_it.quant import NF4_BLOCK, NF4_BLOCKS
from jax_it.sample import SampleSpec
from jax_it.schema import ConfigError  # noqa: F401  (re-exported: callers catch config.ConfigError)
from jax_it.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """The `model` section: which weights to load and how the model computes."""

  SECTION: ClassVar[str] = "model"
  # "gemma3-270m": the packaged GGUF Gemma 3 270M; "random:<preset>": random weights of a
  # families.PRESETS entry; otherwise a checkpoint file/dir (Flax, HF safetensors, GGUF) or hub id.
  path: str = schema.field("gemma3-270m")
  # a tokenizer folder (tokenizer.json + tokenizer_config.json) to use instead of the checkpoint's;
  # random models otherwise borrow the packaged Gemma 3 270M's
  tokenizer: str = schema.field("")
  dtype: str = schema.field("float32", choices=("float32", "bfloat16"))
  # "params": matmuls in the parameters' dtype; "bfloat16": matmul inputs rounded to bfloat16
  # with float32 accumulation, everything else (residual stream, norms, softmax) in float32
  matmul: str = schema.field("params", choices=("params", "bfloat16"))
  remat: bool = schema.field(False)  # recompute each layer in the backward pass
  # weight-only quantized base (quant.py): int8 per output channel, or nf4 (QLoRA's 4 bits)
  quant: str = schema.field("none", choices=("none", "int8", "nf4"))
  nf4_block: int = schema.field(NF4_BLOCK, choices=NF4_BLOCKS)  # weights per absmax
  # nf4: the block absmax in 8 bits (bitsandbytes' compress_statistics, QLoRA's double quant)
  nf4_double_quant: bool = schema.field(True)
  # implementation of matmuls and weight indexing (ops.py): "auto" picks by backend
  kernels: str = schema.field("auto", choices=("auto", "plain", "cpu"))
  # attention kernel (ops.py): "auto" is cuDNN flash attention on GPU, splash on TPU, XLA on CPU
  attention: str = schema.field("auto", choices=("auto", "xla", "cudnn", "splash"))

  def __post_init__(self):
    schema.validate(self)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  """The `checkpoint` section: when the run saves and how many saves it keeps."""

  SECTION: ClassVar[str] = "checkpoint"
  every: int = schema.field(0, check=schema.NON_NEGATIVE)  # steps; 0: only at the end
  keep: int = schema.field(3, check=schema.POSITIVE)
  async_save: bool = schema.field(True)

  def __post_init__(self):
    schema.validate(self)


@dataclasses.dataclass(frozen=True)
class ReportSection:
  """The `report` section: the before/after evaluation at the end of a run."""

  SECTION: ClassVar[str] = "report"
  eval_samples: int = schema.field(20, check=schema.NON_NEGATIVE)  # held-out records generated
  show: int = schema.field(3, check=schema.NON_NEGATIVE)  # of those, how many printed in full

  def __post_init__(self):
    schema.validate(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelSection = dataclasses.field(default_factory=ModelSection)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
  generate: SampleSpec = dataclasses.field(default_factory=SampleSpec)
  report: ReportSection = dataclasses.field(default_factory=ReportSection)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}


def _unknown_key(where: str, key: str, section: str) -> ConfigError:
  return ConfigError(f"{where}: unknown key {key!r} in section {section!r}; "
                     f"valid keys: {', '.join(schema.keys(SECTIONS[section]))}")


def _unknown_section(where: str, name: str) -> ConfigError:
  return ConfigError(f"{where}: unknown section {name!r}; valid sections: {', '.join(SECTIONS)}")


def _located(where: str):
  """Prefix a section's own ConfigError with where the values came from."""
  class _Ctx:
    def __enter__(self):
      return self

    def __exit__(self, kind, err, tb):
      if kind is ConfigError and not str(err).startswith(where):
        raise ConfigError(f"{where}: {err}") from None
  return _Ctx()


# ---------------------------------------------------------------------------------------------
# Building from plain data, overrides


def _sections_raw(raw: Any, where: str) -> dict[str, dict]:
  """{section: {key: value}} from YAML data, with unknown sections and keys refused."""
  raw = {} if raw is None else raw
  if not isinstance(raw, dict):
    raise ConfigError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
  out = {}
  for name, values in raw.items():
    if name not in SECTIONS:
      raise _unknown_section(where, name)
    values = {} if values is None else values
    if not isinstance(values, dict):
      raise ConfigError(f"{where}: section {name!r} must be a mapping, got {values!r}")
    for key in values:
      if key not in schema.keys(SECTIONS[name]):
        raise _unknown_key(where, key, name)
    out[name] = dict(values)
  return out


def from_dict(raw: dict | None, where: str = "config") -> RunConfig:
  """A RunConfig from nested plain data (as read from YAML), every section checked."""
  with _located(where):
    return RunConfig(**{name: SECTIONS[name](**values)
                        for name, values in _sections_raw(raw, where).items()})


def _parse_override_value(text: str, tp) -> Any:
  """A YAML scalar/list; text that YAML cannot read, or reads as a non-string, stays a string
  where the field accepts one (so templates and paths need no quoting)."""
  try:
    value = yaml.safe_load(text)
  except yaml.YAMLError:
    return text
  try:
    schema.coerce(value, tp)
    return value
  except TypeError:
    return text


def apply_override(raw: dict[str, dict], override: str, current: RunConfig) -> None:
  """Apply one `section.key=value` (or `data.fields.output=answer`) to the raw sections.

  The value is checked alone here (the message names the override); how values fit together
  is checked once all overrides are in, when the sections are built.
  """
  where = f"override {override!r}"
  key, sep, text = override.partition("=")
  parts = key.strip().split(".")
  if not sep or len(parts) < 2 or not all(parts):
    raise ConfigError(f"{where}: expected section.key=value")
  name, field_name, rest = parts[0], parts[1], parts[2:]
  if name not in SECTIONS:
    raise _unknown_section(where, name)
  cls = SECTIONS[name]
  if field_name not in schema.keys(cls):
    raise _unknown_key(where, field_name, name)
  section = raw.setdefault(name, {})
  if rest:  # one level into a mapping field, e.g. data.fields.output
    mapping = section.get(field_name, getattr(getattr(current, name), field_name))
    if not isinstance(mapping, dict) or len(rest) != 1:
      raise ConfigError(f"{where}: {field_name!r} has no sub-keys")
    value = {**mapping, rest[0]: text}
  else:
    value = _parse_override_value(text, schema.keys(cls)[field_name][1])
  with _located(where):
    section[field_name] = schema.check_value(cls, field_name, value)


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
  sections = _sections_raw(raw, where)
  with _located(where):
    current = RunConfig(**{n: SECTIONS[n](**v) for n, v in sections.items()})
  for override in overrides:
    apply_override(sections, override, current)
  return from_dict(sections, f"{where} with overrides {' '.join(overrides)}" if overrides
                   else where)


def to_dict(cfg: RunConfig) -> dict:
  """Nested plain data (dicts, lists, scalars), as YAML would hold it; internal fields left out."""
  def plain(v):
    return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
  return {name: {k: plain(getattr(getattr(cfg, name), k)) for k in schema.keys(cls)}
          for name, cls in SECTIONS.items()}


def save_config(cfg: RunConfig, path: str) -> None:
  """Writes `cfg` as YAML that `load_config` reads back to an equal config."""
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
