"""Records from JSON lists, JSONL, parquet or the hub: read, validated, bad ones reported.

Two kinds of record come out, whatever the file's schema:
  instruction records  {"instruction", "input", "output"}            (format "alpaca")
  conversations        {"messages": [{"role", "content"}, ...]}     (formats "messages", "sharegpt")
with roles normalized to system / user / assistant ("model", ShareGPT's "human"/"gpt" mapped).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RECORD_FIELDS = ("instruction", "input", "output")
DEFAULT_FIELDS = {k: k for k in RECORD_FIELDS}
FORMATS = ("auto", "alpaca", "messages", "sharegpt")
# a format's list key and its turns' (role, content) keys
_TURN_KEYS = {"messages": ("messages", "role", "content"),
              "sharegpt": ("conversations", "from", "value")}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "model": "assistant"}
SHAREGPT_ROLES = {**ROLES, "human": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant"}
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
  # record id -> token count before any cut at max_len (the length percentiles)
  lengths: dict[int, int] = dataclasses.field(default_factory=dict)

  def summary(self) -> str:
    return (f"{self.loaded} records loaded, {len(self.skipped)} bad records skipped, "
            f"{len(self.truncated)} truncated, {len(self.dropped)} dropped as too long, "
            f"{len(self.no_loss)} dropped with no loss token left")


def is_conversation(record: dict) -> bool:
  return "messages" in record


def read_records(path: str | Sequence[str], fields: dict[str, str] | None = None,
                 on_error: str = "raise", stats: DataStats | None = None,
                 format: str = "auto",  # pylint: disable=redefined-builtin
                 require_output: bool = True) -> list[dict]:
  """All records of `path` (files in order), validated and normalized (see the module doc).

  `format` "auto" reads each file by its first record's keys ("messages", "conversations",
  else Alpaca). `fields` maps instruction/input/output to the keys of Alpaca-format files.
  A bad record raises DataError, or with on_error="skip" is left out and its message appended
  to `stats.skipped`. require_output=False (prompts to evaluate without references) accepts
  instruction records without an output and conversations that end with a user turn.
  """
  if format not in FORMATS:
    raise DataError(f"data.format={format!r}: expected one of {', '.join(FORMATS)}")
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
    kind = detect_format(raw[0][1]) if format == "auto" else format
    for where, rec in raw:
      try:
        if kind == "alpaca":
          out.append(validate_record(rec, fields, where, require_output))
        else:
          out.append(validate_conversation(rec, kind, where, require_output))
      except DataError as e:
        _skip_or_raise(e, on_error, stats)
  if not out:
    raise DataError(f"{path}: no valid records ({len(stats.skipped)} skipped)")
  stats.loaded += len(out)
  return out


def validate_record(rec: Any, fields: dict[str, str], where: str,
                    require_output: bool = True) -> dict[str, str]:
  """The record as {"instruction", "input", "output"}, or DataError saying what is wrong."""
  if not isinstance(rec, dict):
    raise DataError(f"{where}: expected an object with keys {list(fields.values())}, "
                    f"got {type(rec).__name__}")
  out = {}
  for role in RECORD_FIELDS:
    key = fields[role]
    if key not in rec:
      if role == "input" or (role == "output" and not require_output):
        out[role] = ""  # a record without an input has an empty one
        continue
      hint = ""
      if detect_format(rec) != "alpaca":
        hint = (f": it is a conversation ({detect_format(rec)} format); set "
                f"data.format={detect_format(rec)} or auto")
      raise DataError(f"{where}: missing key {key!r} ({role}); record has keys "
                      f"{sorted(rec)}{hint}")
    value = rec[key]
    if not isinstance(value, str):
      raise DataError(f"{where}: key {key!r}: expected a string, got {type(value).__name__}")
    if role != "input" and not value.strip():
      raise DataError(f"{where}: key {key!r}: expected a non-empty string, got {value!r}")
    out[role] = value
  return out


def detect_format(rec: Any) -> str:
  """"messages", "sharegpt" or "alpaca", by the keys of one raw record."""
  if isinstance(rec, dict):
    for kind, (key, _, _) in _TURN_KEYS.items():
      if key in rec and not {"instruction", "output"} <= set(rec):
        return kind
  return "alpaca"


def validate_conversation(rec: Any, kind: str, where: str,
                          require_output: bool = True) -> dict[str, list[dict[str, str]]]:
  """A conversation record as {"messages": [{"role", "content"}]}, roles system/user/assistant:
  an optional system turn first, then user and assistant turns alternating from a user turn,
  with at least one assistant turn (something to train on); DataError naming the key otherwise."""
  list_key, role_key, content_key = _TURN_KEYS[kind]
  roles = SHAREGPT_ROLES if kind == "sharegpt" else ROLES
  if not isinstance(rec, dict) or list_key not in rec:
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    hint = ("; it is an Alpaca record: set data.format=alpaca or auto"
            if isinstance(rec, dict) and detect_format(rec) == "alpaca" else "")
    raise DataError(f"{where}: missing key {list_key!r} ({kind} format); record has {keys}{hint}")
  turns = rec[list_key]
  if not isinstance(turns, list) or not turns:
    raise DataError(f"{where}: key {list_key!r}: expected a non-empty list of turns, got "
                    f"{turns!r:.80}")
  messages = []
  for i, turn in enumerate(turns):
    at = f"{where}: {list_key}[{i}]"
    if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
      raise DataError(f"{at}: expected an object with keys {role_key!r} and {content_key!r}, "
                      f"got {turn!r:.80}")
    role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
    if role is None:
      raise DataError(f"{at}.{role_key}: unknown role {turn[role_key]!r}; expected one of "
                      f"{', '.join(roles)}")
    content = _text_content(turn[content_key], f"{at}.{content_key}")
    if not content.strip():
      raise DataError(f"{at}.{content_key}: empty content")
    messages.append({"role": role, "content": content})
  first = 1 if messages[0]["role"] == "system" else 0
  for i, m in enumerate(messages[first:], first):
    expected = "user" if (i - first) % 2 == 0 else "assistant"
    if m["role"] != expected:
      before = messages[i - 1]["role"] if i else None
      why = (f"two {before} turns in a row" if before == m["role"] else
             "a system turn after the first turn" if m["role"] == "system" else
             "a conversation must start with a user turn (after an optional system turn)")
      raise DataError(f"{where}: {list_key}[{i}].{role_key}: {why}; expected {expected} turns "
                      "and model turns to alternate")
  if not require_output and messages[-1]["role"] == "user":
    return {"messages": messages}  # a prompt: the model's reply is what is asked for
  if not any(m["role"] == "assistant" for m in messages):
    raise DataError(f"{where}: key {list_key!r}: no model (assistant) turn, nothing to train on")
  return {"messages": messages}


def _text_content(value: Any, at: str) -> str:
  """A turn's text: a string, or a list of {"type": "text", "text"} parts (each trimmed and
  joined, as Gemma's chat template renders them)."""
  if isinstance(value, str):
    return value
  if isinstance(value, list) and all(isinstance(p, dict) for p in value):
    kinds = {p.get("type") for p in value}
    if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in value):
      return "".join(p["text"].strip() for p in value)
    raise DataError(f"{at}: only text parts are supported, got part types "
                    f"{sorted(map(str, kinds))}")
  raise DataError(f"{at}: expected a string or a list of text parts, got {type(value).__name__}")


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

