"""The training loop of `run.py train`: steps, validation, checkpoints, resume, Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys

import jax

from jax_it import data, lora, train
from jax_it.run import checkpoint, cluster, evaluate
from jax_it.run.metrics import MetricsLog, StepReporter
from jax_it.run.setup import Context, Interrupted, identity


class _Interrupt:
  """Turns Ctrl-C into a flag, so the loop can save and stop between steps."""

  def __init__(self):
    self.hit = False
    self.previous = signal.signal(signal.SIGINT, self._handle)

  def _handle(self, *_):
    if jax.process_count() > 1:
      # the processes would stop at different steps and wait on each other: all stop at once,
      # unsaved; the same command resumes from the last checkpoint
      print(f"\ninterrupted on process {jax.process_index()}; stopping every process without "
            "saving. Run the same command to resume from the last checkpoint", file=sys.stderr)
      cluster.fail(f"interrupted (Ctrl-C) on process {jax.process_index()}", 130)
    self.hit = True
    signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C stops at once

  def restore(self):
    signal.signal(signal.SIGINT, self.previous)


def _resume(ctx: Context, ckpt, adapter, opt_state, it, steps: int):
  """The latest checkpoint's state (the iterator restored in place), or the fresh one."""
  # every process must start from the same step (a shared directory seen late by one host
  # would not): refused with one line otherwise
  cluster.agree("checkpoint steps to resume from", {"latest step": ckpt.latest_step()})
  if ckpt.latest_step() is None:
    return adapter, opt_state, 0
  adapter, opt_state, start = ckpt.restore(adapter, opt_state, it, identity(ctx.cfg))
  if jax.process_index() == 0:
    done = "; training is complete, evaluating only" if start >= steps else ""
    print(f"resuming from the step-{start} checkpoint in {ctx.run_dir}{done} (a fresh run needs "
          "another --run-dir)", flush=True)
  return adapter, opt_state, start


def train_loop(ctx: Context, steps: int, progress: bool = True) -> dict:
  """Train to step `steps` (or Ctrl-C), resuming from the run's latest checkpoint that reads.
  Returns a summary."""
  cfg, t = ctx.cfg, ctx.cfg.train
  optimizer, schedule = train.optimizer(t, steps)
  # replicated over the whole mesh before a restore, so orbax reads the checkpoint straight into
  # that placement on every process (no array has to cross from one host to another)
  adapter = train.replicate(
      lora.init(jax.random.key(cfg.lora.seed), ctx.mcfg, cfg.lora, params=ctx.params), ctx.mesh)
  opt_state = train.replicate(optimizer.init(adapter), ctx.mesh)
  it = iter(data.train_dataset(ctx.splits["train"], ctx.tokenizer, cfg.data, t.batch_size))
  ckpt = checkpoint.Checkpointer(ctx.run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  ident = identity(cfg)
  adapter, opt_state, start = _resume(ctx, ckpt, adapter, opt_state, it, steps)
  step_fn = train.make_train_step(ctx.mcfg, optimizer, ctx.mesh, t, remat=cfg.model.remat)
  log = MetricsLog(ctx.run_dir, start)
  reporter = StepReporter(log, schedule, start, steps, t.log_every, progress)
  stop, pending, last_saved = _Interrupt(), None, start
  key = jax.random.key(t.seed)
  try:
    step = start
    while step < steps and not stop.hit:
      batch = next(it)
      real = int(batch["batch_real_tokens"])  # of the global batch, not only this process's rows
      placed = train.prepare_batch(batch, ctx.mesh, t.micro_batches)
      if step == start:
        _print_plan(ctx, step_fn, placed)
      adapter, opt_state, metrics = step_fn(adapter, opt_state, ctx.params, placed,
                                            jax.random.fold_in(key, step))
      step += 1
      _fault_injection(step)
      if pending is not None:  # read the previous step's metrics: the host never waits on this one
        reporter.report(*pending)
      pending = (step, metrics, real)
      if (t.eval_every and step % t.eval_every == 0) or step == steps:
        _validate(ctx, log, step, adapter)
      if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
        reporter.report(*pending)
        pending = None
        ckpt.save(step, adapter, opt_state, it, ident)
        last_saved = step
    if pending is not None:
      reporter.report(*pending)
    if step > last_saved:
      ckpt.save(step, adapter, opt_state, it, ident, force=True)
    if stop.hit:
      raise Interrupted(f"interrupted at step {step}; saved. Run the same command to resume")
    return {"steps": step, "adapter": adapter, "log": log.path}
  finally:
    ckpt.close()  # waits for an async save in flight, also when the run failed
    stop.restore()
    log.close()
    reporter.close()


def _print_plan(ctx: Context, step_fn, batch: dict) -> None:
  """The memory plan (run.py plan) of the step about to run, compiled for the first batch's
  shapes: the step's call that follows reuses that compile. Pad-mode rows shorter than
  data.max_len would not match it: their step temporaries are estimated instead."""
  from jax_it.run import plan
  full = batch["tokens"].shape[1] == ctx.cfg.data.max_len
  p = plan.memory_plan(ctx.cfg, ctx.mcfg, ctx.mesh, ctx.params, step=step_fn,
                       capacity=batch["loss_idx"].shape[1], compile_step=full)
  if jax.process_index() == 0:
    print(plan.format_plan(p), flush=True)
    if p["fits"] is False:
      print("warning: the plan above exceeds the device's memory", flush=True)


def _fault_injection(step: int) -> None:
  """For the resume tests: JAX_IT_KILL_AT_STEP=N SIGKILLs every process once step N is done,
  before its checkpoint is written; N@P kills only process P."""
  spec = os.environ.get("JAX_IT_KILL_AT_STEP")
  if not spec:
    return
  at, _, who = spec.partition("@")
  if int(at) == step and (not who or int(who) == jax.process_index()):
    os.kill(os.getpid(), signal.SIGKILL)


def _validate(ctx: Context, log: MetricsLog, step: int, adapter):
  if ctx.splits["validation"]:
    log.write({"step": step, "val_loss": evaluate.eval_loss(ctx, adapter, ctx.splits["validation"],
                                                            ctx.cfg.train.eval_batches)})
