"""Scoring, as IFEval defines it: per-constraint checks and the four strict/loose accuracies.

`score` follows IFEval: strict checks the response as given; loose also tries it without its first
line, its last line or both, and each of those with every `*` removed, and a constraint passes
loosely when any of the eight variants passes.
"""

from __future__ import annotations

from jax_it.ifeval.kinds import constraint


def loose_variants(response: str) -> list[str]:
  """The eight texts loose scoring tries: the response, without its first line, its last line or
  both (those three stripped), and each of the four with every `*` removed."""
  lines = response.split("\n")
  cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
         "\n".join(lines[1:-1]).strip()]
  return cut + [text.replace("*", "") for text in cut]


def check(record: dict, response: str, loose: bool = False) -> list[bool]:
  """Per constraint of `record`, whether `response` obeys it; an empty response obeys none."""
  variants = loose_variants(response) if loose else [response]
  return [any(v.strip() and c.check(v) for v in variants)
          for c in map(constraint, record["constraints"])]


def score(records: list[dict], responses: list[str]) -> dict:
  """IFEval's four accuracies: per prompt (every constraint obeyed) and per instruction (the
  fraction of all constraints obeyed), each strict and loose; also per kind and the prompt count."""
  if len(records) != len(responses):
    raise ValueError(f"{len(records)} records but {len(responses)} responses")
  prompts = {"strict": 0, "loose": 0}
  passed = {"strict": 0, "loose": 0}
  total = 0
  per_kind: dict[str, dict] = {}
  for record, response in zip(records, responses):
    strict, loose = check(record, response), check(record, response, loose=True)
    prompts["strict"] += all(strict)
    prompts["loose"] += all(loose)
    passed["strict"] += sum(strict)
    passed["loose"] += sum(loose)
    total += len(strict)
    for spec, s, lo in zip(record["constraints"], strict, loose):
      entry = per_kind.setdefault(spec["kind"], {"n": 0, "strict": 0, "loose": 0})
      entry["n"] += 1
      entry["strict"] += s
      entry["loose"] += lo
  for entry in per_kind.values():
    entry["strict"] /= entry["n"]
    entry["loose"] /= entry["n"]
  n = len(records)
  return {"prompt_strict": prompts["strict"] / n if n else 0.0,
          "prompt_loose": prompts["loose"] / n if n else 0.0,
          "instruction_strict": passed["strict"] / total if total else 0.0,
          "instruction_loose": passed["loose"] / total if total else 0.0,
          "per_kind": dict(sorted(per_kind.items())), "n_prompts": n}
