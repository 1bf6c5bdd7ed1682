"""Generation speed on the real Gemma 3 270M: the one-batch loop as it was against the queue of
`sample.generate`, side by side in one process.

Usage: python benchmarks/generate_speed.py [--records 100] [--max-new 512] [--side 32]
                                           [--old-rev ba9be81] [--data DIR] [--no-record]

The model as the default config runs it (bfloat16 weights, bfloat16 matmuls); prompts are the
first Alpaca records of alpaca_en_demo.json in the Alpaca template, greedy, as `eval --data`
generates. Two kinds of run, because stopping is what the queue is about:

  base   the base model, stopping at EOS (it hardly ever does: rows run to --max-new);
  tuned  what a tuned model costs without training one here: a LoRA adapter as
         configs/default.yaml makes it (r=16, all-linear) at its initial zero B, so the tokens
         are base's and the matmuls are LoRA's, stopping at EOS or at a paragraph break ("\n\n"):
         most rows stop within ~50 tokens, some never do.

old: `sample.py` as of --old-rev (read with `git show`), called as evaluate.py called it: 16
prompts a call, each batch running until its longest row stops, its cache as long as the prompt
bucket plus --max-new. new: this checkout's `sample.generate` over all prompts at once (16
slots, refilled). The side-by-side phase runs both on the first --side records, alternating
which goes first; then the new one runs all --records, which is the figure the target is about
(100 records x 512 tokens, base + tuned, in under 10 minutes). The old way's time for all
records is projected from its side-by-side seconds per batch of 16. Wall times include
compiling; tokens/s counts generated tokens (through the stop token).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import common  # benchmarks/ is on sys.path when this file is run as a script

# "new" is this checkout's jax_it, whichever copy an editable install points at
sys.path.insert(0, str(common.HERE.parent))

OLD_REV = "ba9be81"  # the last commit before the queue: one batch, one compiled loop
BATCH = 16  # evaluate.py's batch, and the new path's slots


def old_module(rev: str):
  """jax_it/sample.py as of `rev`, imported as a module of its own."""
  src = subprocess.run(["git", "show", f"{rev}:jax_it/sample.py"], cwd=common.HERE.parent,
                       capture_output=True, text=True, check=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "sample_old.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location("sample_old", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["sample_old"] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def load(data_dir, records: int):
  """(params, model config, tokenizer, prompt ids) of the first Alpaca records."""
  from jax_it import config, sample, templates  # pylint: disable=g-import-not-at-top
  from jax_it.run import setup  # pylint: disable=g-import-not-at-top
  section = config.ModelSection(path="gemma3-270m", dtype="bfloat16", matmul="bfloat16")
  params, mcfg, tokenizer = setup.load_model(section)
  with open(common.alpaca_file(data_dir)) as f:
    rows = json.load(f)[:records]
  prompts = [sample.prompt_ids(tokenizer, templates.format_prompt(r, "alpaca")[0]) for r in rows]
  return params, mcfg, tokenizer, prompts


def kinds(mcfg, tokenizer) -> dict:
  """name -> (adapter or None, stop ids): the base and the tuned-like run."""
  import jax  # pylint: disable=g-import-not-at-top

  from jax_it import lora, templates  # pylint: disable=g-import-not-at-top
  eos = templates.stop_ids("alpaca", tokenizer)
  paragraph = tokenizer.encode("\n\n", add_special_tokens=False)
  assert len(paragraph) == 1, paragraph
  adapter = lora.init(jax.random.key(0), mcfg,
                      lora.LoraConfig(r=16, alpha=32.0, targets="all-linear"))
  return {"base": (None, eos), "tuned": (adapter, (*eos, paragraph[0]))}


def run_old(old, params, mcfg, prompts, adapter, stops, max_new) -> list[list[int]]:
  out = []
  for i in range(0, len(prompts), BATCH):
    out += old.generate(params, mcfg, prompts[i:i + BATCH], lora=adapter, max_new_tokens=max_new,
                        eos_id=stops)
  return out


def run_new(params, mcfg, prompts, adapter, stops, max_new) -> list[list[int]]:
  from jax_it import sample  # pylint: disable=g-import-not-at-top
  return sample.generate(params, mcfg, prompts, lora=adapter, max_new_tokens=max_new,
                         eos_id=stops, batch=BATCH)


def timed(clock, fn, *args) -> dict:
  """fn's rows, wall seconds, compile seconds and generated tokens."""
  clock.take()
  t = time.perf_counter()
  rows = fn(*args)
  wall = time.perf_counter() - t
  tokens = sum(map(len, rows))
  return {"rows": rows, "wall": wall, "compile": clock.take(), "tokens": tokens,
          "tok_s": tokens / wall}


def forward_agreement(params, mcfg, prompts, rows, n: int = 4) -> tuple[int, int]:
  """(tokens that are the argmax of the full forward over prompt + row, tokens) over the first
  n rows: the greedy decode a cache should reproduce."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jax_it import model  # pylint: disable=g-import-not-at-top
  hits = total = 0
  for prompt, row in list(zip(prompts, rows))[:n]:
    logits = model.forward(params, jnp.asarray([prompt + row]), mcfg)[0, len(prompt) - 1:-1]
    hits += int((np.asarray(logits).argmax(-1) == np.asarray(row)).sum())
    total += len(row)
  return hits, total


class OtherLoad:
  """CPUs kept busy by other processes while this one ran: the machine's busy time from
  /proc/stat less this process's own CPU time (the load average would count this one too)."""

  def __init__(self):
    self.start = self._now()

  @staticmethod
  def _now():
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    own = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, own.ru_utime + own.ru_stime

  def cpus(self) -> float:
    (t0, b0, o0), (t1, b1, o1) = self.start, self._now()
    return max(0.0, (b1 - b0) - (o1 - o0)) / (t1 - t0)


def same_rows(a, b) -> int:
  return sum(x == y for x, y in zip(a, b))


def stop_profile(rows, max_new: int) -> str:
  """How the rows ended: stopped within 50 tokens, later, ran to the limit."""
  early = sum(len(r) <= 50 and len(r) < max_new for r in rows)
  full = sum(len(r) >= max_new for r in rows)
  return f"{early} stop within 50, {len(rows) - early - full} later, {full} run to {max_new}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--records", type=int, default=100, help="the new path's full run (0: skip)")
  ap.add_argument("--max-new", type=int, default=512)
  ap.add_argument("--side", type=int, default=32, help="records run both ways, side by side")
  ap.add_argument("--old-rev", default=OLD_REV, help="the commit whose sample.py is 'old'")
  ap.add_argument("--data", default=common.SHARED_DATA, help="folder holding alpaca_en_demo.json")
  ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
  args = ap.parse_args()

  others = OtherLoad()
  clock = common.CompileClock()
  old = old_module(args.old_rev)
  params, mcfg, tokenizer, prompts = load(args.data, max(args.records, args.side))
  side = prompts[:args.side]
  lens = sorted(map(len, prompts))
  print(f"{len(prompts)} prompts of {lens[0]}-{lens[-1]} tokens (median {lens[len(lens) // 2]})",
        flush=True)

  results = {}
  for i, (kind, (adapter, stops)) in enumerate(kinds(mcfg, tokenizer).items()):
    order = [("old", run_old, (old,)), ("new", run_new, ())]
    for way, fn, extra in (order if i % 2 == 0 else order[::-1]):
      r = timed(clock, fn, *extra, params, mcfg, side, adapter, stops, args.max_new)
      results[kind, way] = r
      print(f"{kind} {way}: {r['tokens']} tokens in {r['wall']:.1f} s ({r['compile']:.1f} s "
            f"compiling), {r['tok_s']:.1f} tokens/s", flush=True)
    if args.records:
      r = timed(clock, run_new, params, mcfg, prompts[:args.records], adapter, stops, args.max_new)
      results[kind, "full"] = r
      print(f"{kind} new, all {args.records}: {r['tokens']} tokens in {r['wall']:.1f} s "
            f"({r['compile']:.1f} s compiling), {stop_profile(r['rows'], args.max_new)}",
            flush=True)
  base_old, base_new = results["base", "old"]["rows"], results["base", "new"]["rows"]
  agree = {way: forward_agreement(params, mcfg, side, rows)
           for way, rows in (("old", base_old), ("new", base_new))}
  text = report(args, results, agree, lens, others.cpus())
  print(text)
  if not args.no_record:
    common.record(text)


def report(args, results, agree, lens, others: float) -> str:
  batches = math.ceil(args.side / BATCH)
  rows = ["| run | way | records | generated tokens | wall s (compile s) | tokens/s | new/old "
          "tokens/s |", "|---|---|---|---|---|---|---|"]
  for kind in ("base", "tuned"):
    o, n = results[kind, "old"], results[kind, "new"]
    for way, r in (("old", o), ("new", n)):
      ratio = f"**{n['tok_s'] / o['tok_s']:.2f}**" if way == "new" else ""
      rows.append(f"| {kind} | {way} | {args.side} | {r['tokens']} | {r['wall']:.1f} "
                  f"({r['compile']:.1f}) | {r['tok_s']:.1f} | {ratio} |")
  body = "\n".join(rows)
  notes = []
  for kind in ("base", "tuned"):
    o, n = results[kind, "old"], results[kind, "new"]
    notes.append(f"- {kind}: {stop_profile(n['rows'], args.max_new)} (new); rows with the same "
                 f"tokens old and new: {same_rows(o['rows'], n['rows'])} of {args.side}")
  for way, (hits, total) in agree.items():
    notes.append(f"- base, first 4 rows, {way}: {hits} of {total} generated tokens are the "
                 "argmax of the full forward (no cache) over prompt + row")
  if args.records:
    full = {k: results[k, "full"] for k in ("base", "tuned")}
    total = sum(r["wall"] for r in full.values())
    proj = sum(results[k, "old"]["wall"] / batches * math.ceil(args.records / BATCH)
               for k in ("base", "tuned"))
    body += ("\n\n| all records, new way | records | generated tokens | wall s (compile s) | "
             "tokens/s |\n|---|---|---|---|---|\n")
    body += "\n".join(f"| {k} | {args.records} | {r['tokens']} | {r['wall']:.1f} "
                      f"({r['compile']:.1f}) | {r['tok_s']:.1f} |" for k, r in full.items())
    notes.append(f"- **{args.records} records x {args.max_new} tokens, base + tuned: new "
                 f"{total / 60:.1f} min measured; old {proj / 60:.1f} min projected** (its "
                 f"side-by-side seconds per batch of {BATCH} x {math.ceil(args.records / BATCH)} "
                 "batches)")
  notes.append(f"- other processes kept {others:.2f} of {os.cpu_count()} CPUs busy during the "
               "run" + (": figures disturbed, compare the ratios" if others > 0.2 else ""))
  setup = (f"Gemma 3 270M (bfloat16 weights and matmuls), greedy, first "
           f"{max(args.records, args.side)} records of {common.ALPACA} in the Alpaca template "
           f"(prompts of {lens[0]}-{lens[-1]} tokens), max {args.max_new} new tokens, "
           f"old = sample.py of {args.old_rev} in batches of {BATCH}, new = sample.generate "
           f"over all prompts with {BATCH} slots")
  return common.section("generate_speed.py: the one-batch loop against the queue", setup,
                        body + "\n\n" + "\n".join(notes))


if __name__ == "__main__":
  main()
