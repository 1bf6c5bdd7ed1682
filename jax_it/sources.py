"""Alpaca records from JSON lists, JSONL, parquet or the hub: read, validated, bad ones reported."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RECORD_FIELDS = ("instruction", "input", "output")
DEFAULT_FIELDS = {k: k for k in RECORD_FIELDS}
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


class DataError(ValueError):
  """Bad data or data settings; the message names the file, record and key at fault."""


@dataclasses.dataclass
class DataStats:
  """Counts of what the pipeline did not pass through unchanged (never a silent drop)."""

  loaded: int = 0  # valid records read
  skipped: list[str] = dataclasses.field(default_factory=list)  # one message per bad record
  # ids (positions in the records given to the pipeline) of examples cut to max_len / dropped
  # as too long; sets, so reading an example again (next epoch, resumed run) counts it once
  truncated: set[int] = dataclasses.field(default_factory=set)
  dropped: set[int] = dataclasses.field(default_factory=set)
  # examples left with no loss token once cut to max_len: dropped, never trained as empty targets
  no_loss: set[int] = dataclasses.field(default_factory=set)

  def summary(self) -> str:
    return (f"{self.loaded} records loaded, {len(self.skipped)} bad records skipped, "
            f"{len(self.truncated)} truncated, {len(self.dropped)} dropped as too long, "
            f"{len(self.no_loss)} dropped with no loss token left")


def read_records(path: str | Sequence[str], fields: dict[str, str] | None = None,
                 on_error: str = "raise", stats: DataStats | None = None) -> list[dict[str, str]]:
  """All records of `path` (files in order), validated and normalized to RECORD_FIELDS.

  `fields` maps instruction/input/output to the records' keys. A bad record raises DataError,
  or with on_error="skip" is left out and its message appended to `stats.skipped`.
  """
  stats = DataStats() if stats is None else stats
  paths = [path] if isinstance(path, (str, Path)) else list(path)
  if not paths or not all(str(p).strip() for p in paths):
    raise DataError(f"data.path={path!r}: expected a file, a list of files or a hub name")
  fields = {**DEFAULT_FIELDS, **(fields or {})}
  out = []
  for one in paths:
    raw = _read_source(str(one), on_error, stats)
    if not raw:
      raise DataError(f"{one}: no records")
    for where, rec in raw:
      try:
        out.append(validate_record(rec, fields, where))
      except DataError as e:
        _skip_or_raise(e, on_error, stats)
  if not out:
    raise DataError(f"{path}: no valid records ({len(stats.skipped)} skipped)")
  stats.loaded += len(out)
  return out


def validate_record(rec: Any, fields: dict[str, str], where: str) -> dict[str, str]:
  """The record as {"instruction", "input", "output"}, or DataError saying what is wrong."""
  if not isinstance(rec, dict):
    raise DataError(f"{where}: expected an object with keys {list(fields.values())}, "
                    f"got {type(rec).__name__}")
  out = {}
  for role in RECORD_FIELDS:
    key = fields[role]
    if key not in rec:
      if role == "input":  # a record without an input has an empty one
        out[role] = ""
        continue
      raise DataError(f"{where}: missing key {key!r} ({role}); record has keys {sorted(rec)}")
    value = rec[key]
    if not isinstance(value, str):
      raise DataError(f"{where}: key {key!r}: expected a string, got {type(value).__name__}")
    if role != "input" and not value.strip():
      raise DataError(f"{where}: key {key!r}: expected a non-empty string, got {value!r}")
    out[role] = value
  return out


def _skip_or_raise(err: DataError, on_error: str, stats: DataStats) -> None:
  if on_error == "raise":
    raise err
  stats.skipped.append(str(err))


def _read_source(path: str, on_error: str, stats: DataStats) -> list[tuple[str, Any]]:
  """(location, raw record) pairs of one file or hub dataset."""
  p = Path(path)
  readers = {".json": _read_json, ".jsonl": lambda p: _read_jsonl(p, on_error, stats),
             ".parquet": _read_parquet}
  if not p.exists():
    if p.suffix not in readers and _HUB_NAME.match(path):
      return _read_hub(path)
    raise DataError(f"{path}: no such file (nor a hub dataset name like 'tatsu-lab/alpaca')")
  if p.suffix not in readers:
    raise DataError(f"{path}: unknown file type; expected .json, .jsonl or .parquet")
  return readers[p.suffix](p)


def _read_text(p: Path) -> str:
  try:
    return p.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{p}: cannot read: {e}") from None


def _read_json(p: Path) -> list[tuple[str, Any]]:
  try:
    data = json.loads(_read_text(p))
  except json.JSONDecodeError as e:
    raise DataError(f"{p}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
  if not isinstance(data, list):
    raise DataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
  return [(f"{p}: record {i}", rec) for i, rec in enumerate(data)]


def _read_jsonl(p: Path, on_error: str, stats: DataStats) -> list[tuple[str, Any]]:
  out = []
  for line_no, line in enumerate(_read_text(p).splitlines(), 1):
    if not line.strip():
      continue
    where = f"{p}: record {len(out)} (line {line_no})"
    try:
      out.append((where, json.loads(line)))
    except json.JSONDecodeError as e:
      _skip_or_raise(DataError(f"{p}:{line_no}:{e.colno}: malformed JSON: {e.msg}"),
                     on_error, stats)
  return out


def _read_parquet(p: Path) -> list[tuple[str, Any]]:
  import datasets  # pylint: disable=g-import-not-at-top  # slow import, only for parquet

  try:
    rows = datasets.Dataset.from_parquet(str(p), keep_in_memory=True).to_list()
  except Exception as e:  # pylint: disable=broad-except  # arrow raises many types
    raise DataError(f"{p}: cannot read parquet: {type(e).__name__}: {e}") from None
  return [(f"{p}: record {i}", rec) for i, rec in enumerate(rows)]


def _read_hub(name: str) -> list[tuple[str, Any]]:
  import datasets  # pylint: disable=g-import-not-at-top

  try:
    rows = datasets.load_dataset(name, split="train").to_list()
  except Exception as e:  # pylint: disable=broad-except  # network errors come in many types
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise DataError(f"{name}: cannot load hub dataset ({type(e).__name__}: {first}); "
                    "download it and pass the local .json/.jsonl/.parquet file") from None
  return [(f"{name}: record {i}", rec) for i, rec in enumerate(rows)]

