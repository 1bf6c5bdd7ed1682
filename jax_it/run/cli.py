"""The subcommands behind run.py; expected failures become one-line errors, never tracebacks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

from jax_it import config, data, weights
from jax_it.run import checkpoint, setup
from jax_it.run.lock import RunLock


class UsageError(ValueError):
  """A command line that misses what its command needs."""


EXPECTED = (config.ConfigError, data.DataError, weights.CheckpointError, setup.RunError,
            UsageError, checkpoint.CheckpointMismatch, FileNotFoundError, FileExistsError,
            PermissionError)


def run(args) -> int:
  try:
    maybe_initialize_distributed()
    return COMMANDS[args.command](args)
  except setup.Interrupted as e:
    print(f"\n{e}", file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    return 130
  except EXPECTED as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def maybe_initialize_distributed():
  """Join a multi-process run when the environment describes one.

  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (any cluster), or
  JAX_DISTRIBUTED=1 to let jax detect the cluster (Cloud TPU pods, SLURM). Each process then
  feeds its share of the global batch.
  """
  import jax
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    try:
      n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except (KeyError, ValueError):
      raise UsageError("JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                       "must be set to integers too") from None
    if n < 1 or not 0 <= i < n:  # refused here, before any process waits for the others
      raise UsageError(f"JAX_PROCESS_ID={i} with JAX_NUM_PROCESSES={n}: expected "
                       f"0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES")
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=n, process_id=i)
  elif env.get("JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


# ---------------------------------------------------------------------------------------------
# Run directories and configs


def default_config() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))), "configs", "default.yaml")


def run_dir_of(args, config_path: str | None) -> str:
  if args.run_dir:
    return args.run_dir
  stem = os.path.splitext(os.path.basename(config_path or "default"))[0]
  return os.path.join("runs", stem)


def prepare_run_dir(run_dir: str):
  try:
    os.makedirs(run_dir, exist_ok=True)
    probe = os.path.join(run_dir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("")
    os.remove(probe)
  except OSError as e:
    raise setup.RunError(f"run directory {run_dir} is not writable: {e.strerror}") from None


def saved_config(args) -> tuple[config.RunConfig, str]:
  """The config of an existing run (--run-dir), or of --config."""
  if args.run_dir and os.path.exists(os.path.join(args.run_dir, "config.yaml")):
    return config.load_config(os.path.join(args.run_dir, "config.yaml"), args.overrides), \
        args.run_dir
  if args.config:
    return config.load_config(args.config, args.overrides), run_dir_of(args, args.config)
  where = args.run_dir or "(none given)"
  raise UsageError(f"run directory {where} holds no config.yaml; give --run-dir of a run "
                   f"started with `run.py train`, or --config FILE")


def trained_run(args) -> tuple[config.RunConfig, str]:
  """saved_config of a run that has a checkpoint; checked before any model loads."""
  cfg, run_dir = saved_config(args)
  setup.require_checkpoint(run_dir)
  return cfg, run_dir


def with_adapter(cfg: config.RunConfig, run_dir: str):
  """(context, the run's latest LoRA weights)."""
  ctx = setup.make_context(cfg, run_dir)
  return ctx, setup.load_adapter(ctx)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_train(args) -> int:
  import jax

  from jax_it.run import evaluate, loop
  path = args.config or os.path.relpath(default_config())
  cfg = config.load_config(path, args.overrides)
  run_dir = run_dir_of(args, path)
  created = not os.path.exists(run_dir)
  prepare_run_dir(run_dir)
  lead = jax.process_index() == 0  # one writer per run directory
  lock = RunLock(run_dir, enabled=lead)
  try:
    print(f"run directory: {run_dir}", flush=True)
    try:
      ctx, steps = _start(cfg, run_dir, lead)
    except BaseException:
      if created and lead:  # a failed start leaves no empty run directory behind
        lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)
      raise
    summary = loop.train_loop(ctx, steps, progress=not args.no_progress)
    if cfg.report.eval_samples and ctx.splits["test"]:
      result = evaluate.compare(ctx, summary["adapter"], ctx.splits["test"],
                                cfg.report.eval_samples)
      if lead:  # every process computes, one writes
        print(evaluate.write(result, run_dir, cfg.report.show))
  finally:
    lock.release()
  return 0


def _start(cfg: config.RunConfig, run_dir: str, lead: bool):
  """Model, data summary (printed and saved as data_summary.json), config.yaml, total steps."""
  ctx = setup.make_context(cfg, run_dir)
  summary = setup.data_summary(ctx)
  print(f"model: {cfg.model.path} ({ctx.mcfg.family}, {ctx.mcfg.num_layers} layers); held out: "
        f"{len(ctx.splits['test'])} test, {len(ctx.splits['validation'])} validation records",
        flush=True)
  print(setup.format_data_summary(summary), flush=True)
  if summary["train_examples"] == 0:
    raise setup.RunError(f"data: no train example left to train on ({summary['train_records']} "
                         "records in the train split; counts above)")
  if lead:
    with open(os.path.join(run_dir, "data_summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    saved = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(saved):
      config.save_config(cfg, saved)
  return ctx, setup.total_steps(ctx, summary)


def cmd_eval(args) -> int:
  from jax_it.run import evaluate
  cfg, run_dir = trained_run(args)
  records = None
  if args.data:  # read before the model loads: a bad file fails in a second, not after it
    records = data.load_records(dataclasses.replace(cfg.data, path=args.data))
  ctx, adapter = with_adapter(cfg, run_dir)
  records = ctx.splits["test"] if records is None else records
  n = cfg.report.eval_samples or len(records)
  result = evaluate.compare(ctx, adapter, records, n)
  print(evaluate.write(result, run_dir, cfg.report.show))
  return 0


def cmd_generate(args) -> int:
  from jax_it.run import evaluate
  if not args.prompt:
    raise UsageError("generate needs --prompt TEXT")
  ctx, adapter = with_adapter(*trained_run(args))
  record = {"instruction": args.prompt, "input": args.input, "output": ""}
  for name, a in ((("base", None),) if args.base else ()) + (("tuned", adapter),):
    text, stopped = evaluate.responses(ctx, [record], a)[0]
    print(f"[{name}{'' if stopped else ', no EOS'}] {text}")
  return 0


def cmd_export(args) -> int:
  from jax_it import lora
  if not args.out:
    raise UsageError("export needs --out DIR")
  cfg, run_dir = trained_run(args)
  # merging needs the float base, also for runs that trained on an int8 one
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant="none"))
  ctx, adapter = with_adapter(cfg, run_dir)
  lora.save_peft(adapter, ctx.mcfg, args.out, base_model=cfg.model.path)
  print(f"PEFT adapter written to {args.out}")
  if args.merged:
    from jax_it.ckpt import hf
    merged_dir = os.path.join(args.out, "merged")
    hf.save_hf(lora.merge(ctx.params, adapter), ctx.mcfg, merged_dir, tokenizer=ctx.tokenizer)
    print(f"merged Hugging Face model written to {merged_dir}")
  return 0


def cmd_compare(args) -> int:
  try:
    import peft  # noqa: F401
    import torch  # noqa: F401
  except ImportError as e:
    raise UsageError(f"compare needs the PyTorch reference ({e.name} is not installed): "
                     "pip install -e \".[torch]\"") from None
  from jax_it.run import compare
  cfg, run_dir = saved_config(args) if (args.run_dir or args.config) else (
      config.load_config(default_config(), args.overrides), run_dir_of(args, None))
  ctx = setup.make_context(compare.float32_config(cfg), run_dir)
  adapter = setup.load_adapter(ctx, required=False)
  report = compare.against_torch(ctx, adapter)
  print(compare.format_report(report))
  return 0 if report["ok"] else 1


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "export": cmd_export,
            "compare": cmd_compare}
