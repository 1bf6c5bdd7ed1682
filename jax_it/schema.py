"""Options declared once: the field helper of every config dataclass and the one validation.

Each library module declares its options as a frozen dataclass (`lora.LoraConfig`,
`data.DataConfig`, `train.TrainConfig`, ...) whose fields carry their allowed values; `config.py`
composes them into the run config read from YAML. Constructing one, from Python or from YAML,
runs `validate`: each value's type (with lossless conversions: int -> float, list -> tuple),
its choices or range, then the class's own `check()` for rules that span several fields.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
  """An option that does not fit its declaration; the message names the key and what fits."""


# A check is (predicate, what the value must be); the text goes into the error message.
Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, ">= 0")
FRACTION: Check = (lambda v: 0 <= v < 1, "in [0, 1)")
PROBABILITY: Check = (lambda v: 0 < v <= 1, "in (0, 1]")
SEED: Check = (lambda v: 0 <= v < 2**32, "in [0, 2**32)")


def field(default, *, choices: tuple | None = None, check: Check | None = None,
          internal: bool = False):
  """A dataclass field with its allowed values (`choices`) or range (`check`).

  `internal` fields are set by code, not by users (e.g. token ids read from the tokenizer):
  they are checked like the others but are no config keys.
  """
  meta = {"choices": choices, "check": check, "internal": internal}
  if isinstance(default, (list, dict)):
    return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


def error(section: str, key: str, value: Any, expected: str) -> ConfigError:
  return ConfigError(f"{section}.{key}={value!r} is invalid; expected {expected}")


# ---------------------------------------------------------------------------------------------
# Types


def type_name(tp) -> str:
  return tp.__name__ if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce(value: Any, tp) -> Any:
  """`value` converted to the annotation `tp`, or TypeError; only lossless conversions."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    for arm in args:
      try:
        return coerce(value, arm)
      except TypeError:
        pass
    raise TypeError
  if tp is type(None):
    if value is None:
      return None
    raise TypeError
  if origin in (list, tuple):
    if not isinstance(value, (list, tuple)):
      raise TypeError
    return origin(coerce(v, args[0]) for v in value)
  if origin is dict:
    if not isinstance(value, dict):
      raise TypeError
    return {coerce(k, args[0]): coerce(v, args[1]) for k, v in value.items()}
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


def keys(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
  """The config keys of a section class: {name: (field, annotation)}, internal fields left out."""
  hints = typing.get_type_hints(cls)
  return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)
          if not f.metadata.get("internal")}


def check_value(cls: type, key: str, value: Any) -> Any:
  """`value` type-checked and range-checked as field `key` of `cls`; ConfigError if it fits not."""
  f = next(f for f in dataclasses.fields(cls) if f.name == key)
  tp = typing.get_type_hints(cls)[key]
  try:
    value = coerce(value, tp)
  except TypeError:
    raise error(cls.SECTION, key, value, type_name(tp)) from None
  choices, check = f.metadata.get("choices"), f.metadata.get("check")
  if choices is not None and value not in choices:
    raise error(cls.SECTION, key, value, "one of " + ", ".join(map(str, choices)))
  if check is not None and not check[0](value):
    raise error(cls.SECTION, key, value, "a value " + check[1])
  return value


def validate(obj) -> None:
  """Check (and normalise in place) every field of a frozen section dataclass, then its check().

  Called from each section's __post_init__, so a config built in Python is held to the same
  rules, with the same messages, as one read from YAML.
  """
  cls = type(obj)
  for f in dataclasses.fields(cls):
    object.__setattr__(obj, f.name, check_value(cls, f.name, getattr(obj, f.name)))
  check = getattr(obj, "check", None)
  if check is not None:
    check()
