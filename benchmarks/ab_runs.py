"""Two checkouts' `run.py train` side by side: alternating runs, per-step losses and tokens/s.

Usage: python benchmarks/ab_runs.py --a DIR --b DIR [--rounds 2] [--steps 12] [--no-record]
           [section.key=value ...]

Each round runs `python DIR/run.py` (with PYTHONPATH=DIR, so each side imports its own jax_it)
on the default config, A then B, in fresh run directories, for `--steps` steps without
evaluation; the overrides go to both. Alternating rounds let a shared machine's drift hit both
sides alike. Reported: the median real tokens/s of the steps after the first two (compilation),
per side and as B/A, and the largest per-step loss difference between the sides: for a change
that should not move the numbers (a refactor), it is the check that it did not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common


def one_run(checkout: str, run_dir: str, steps: int, overrides: list[str]) -> dict:
  cmd = [sys.executable, os.path.join(checkout, "run.py"), "--run-dir", run_dir, "--no-progress",
         f"train.max_steps={steps}", "train.eval_every=0", "train.log_every=1",
         "report.eval_samples=0", "checkpoint.every=0", *overrides]
  env = dict(os.environ, PYTHONPATH=checkout)
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if out.returncode != 0:
    sys.exit(f"{checkout}: run.py failed ({out.returncode}):\n{out.stderr[-2000:]}")
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if '"loss"' in line]
  return {"loss": {r["step"]: r["loss"] for r in records},
          "tok_s": {r["step"]: r["tokens_per_s"] for r in records}, "wall": wall}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--a", required=True, help="checkout A (the baseline)")
  p.add_argument("--b", required=True, help="checkout B")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--no-record", action="store_true")
  p.add_argument("overrides", nargs="*")
  args = p.parse_args()
  runs = {"A": [], "B": []}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for side in ("A", "B"):
        checkout = os.path.abspath(args.a if side == "A" else args.b)
        runs[side].append(one_run(checkout, os.path.join(tmp, f"{side}{r}"), args.steps,
                                  args.overrides))
        print(f"round {r + 1} {side}: {runs[side][-1]['wall']:.0f} s", flush=True)
  median = {s: statistics.median(v for run in runs[s] for k, v in run["tok_s"].items() if k > 2)
            for s in runs}
  loss_diff = max(abs(a["loss"][k] - b["loss"][k])
                  for a, b in zip(runs["A"], runs["B"]) for k in a["loss"])
  walls = {s: ", ".join(f"{run['wall']:.0f}" for run in runs[s]) for s in runs}
  body = "\n".join([
      "| side | checkout | median real tokens/s (steps 3+) | wall per run (s) |",
      "|---|---|---|---|",
      *(f"| {s} | `{getattr(args, s.lower())}` | {median[s]:.0f} | {walls[s]} |" for s in runs),
      "", f"B/A tokens/s: **{median['B'] / median['A']:.3f}**; largest per-step loss difference "
      f"between A and B: {loss_diff:.2e} (step 1 losses: A {runs['A'][0]['loss'][1]:.6f}, "
      f"B {runs['B'][0]['loss'][1]:.6f})"])
  text = common.section("Two checkouts side by side (ab_runs.py)",
                        f"{args.rounds} alternating rounds of {args.steps} steps of the default "
                        f"config, overrides: {' '.join(args.overrides) or 'none'}", body)
  print(text)
  if not args.no_record:
    common.record(text)


if __name__ == "__main__":
  main()
