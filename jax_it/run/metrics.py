"""Per-step metrics: rate, divergence check, metrics.jsonl, TensorBoard, the progress bar."""

from __future__ import annotations

import json
import math
import os
import time

import jax

from jax_it.run.setup import RunError


def strict_json(record: dict) -> str:
  """One JSON line; non-finite floats become null and are named under "nonfinite" (JSON has no
  NaN or Infinity)."""
  bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
  if bad:
    record = {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
  return json.dumps(record, allow_nan=False)


class MetricsLog:
  """metrics.jsonl (truncated to the resumed step, so a resumed log reads as one run) + TensorBoard.

  Only process 0 writes; on the other processes every method does nothing.
  """

  def __init__(self, run_dir: str, resume_step: int):
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.file, self.tb = None, None
    if jax.process_index() != 0:  # one writer per run directory
      return
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if _step_of(line) <= resume_step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(self.path + ".tmp", self.path)
    self.file = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    except ImportError:  # TensorBoard is optional
      self.tb = None

  def write(self, record: dict):
    if self.file is None:
      return
    self.file.write(strict_json(record) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k, v, record["step"])

  def close(self):
    if self.file is not None:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


def _step_of(line: str) -> float:
  """The step of a metrics.jsonl line; a torn last line (killed mid-write) counts as past."""
  try:
    return json.loads(line).get("step", 0)
  except json.JSONDecodeError:
    return math.inf


class StepReporter:
  """Turns a step's device metrics into a logged record, on every process alike.

  Every process keeps its own clock and runs the divergence check, so all of them stop at the
  same step; only process 0's log and progress bar write anything.
  """

  def __init__(self, log: MetricsLog, schedule, start: int, last_step: int, every: int = 1,
               progress: bool = True):
    self.log, self.schedule, self.every, self.last_step = log, schedule, every, last_step
    self.last_time = time.perf_counter()  # the first step's rate includes its compilation
    self.bar = None
    if progress and jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=last_step, initial=start, unit="step", dynamic_ncols=True)

  def report(self, step: int, metrics: dict, real_tokens: int) -> dict:
    m = {k: float(v) for k, v in metrics.items()}  # blocks until that step is done
    now = time.perf_counter()
    seconds, self.last_time = now - self.last_time, now
    if not math.isfinite(m["loss"]) or not m["weights_finite"]:
      what = (f"loss is {m['loss']}" if not math.isfinite(m["loss"]) else
              "the LoRA weights are not finite (learning rate too high?)")
      raise RunError(f"{what} at step {step}; stopped without saving it (the last checkpoint, "
                     f"if any, is intact)")
    record = {"step": step, "loss": m["loss"], "loss_tokens": int(m["tokens"]),
              "real_tokens": real_tokens, "grad_norm": m["grad_norm"],
              "lr": float(self.schedule(step - 1)),
              "tokens_per_s": real_tokens / max(seconds, 1e-9)}
    if step % self.every == 0 or step == self.last_step:
      self.log.write(record)
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                           lr=f"{record['lr']:.2e}")
    return record

  def close(self):
    if self.bar is not None:
      self.bar.close()
