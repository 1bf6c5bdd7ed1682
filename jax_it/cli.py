"""The subcommands behind run.py; expected failures become one-line errors, never tracebacks."""

from __future__ import annotations

import os
import sys

from jax_it import checkpoint, config, data, loop, weights

EXPECTED = (config.ConfigError, data.DataError, weights.CheckpointError, loop.RunError,
            checkpoint.CheckpointMismatch, FileNotFoundError, FileExistsError, PermissionError)


def run(args) -> int:
  try:
    maybe_initialize_distributed()
    return COMMANDS[args.command](args)
  except loop.Interrupted as e:
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
      raise loop.RunError("JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                          "must be set to integers too") from None
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=n, process_id=i)
  elif env.get("JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


# ---------------------------------------------------------------------------------------------
# Run directories and configs


def _run_dir(args, config_path: str | None) -> str:
  if args.run_dir:
    return args.run_dir
  stem = os.path.splitext(os.path.basename(config_path or "default"))[0]
  return os.path.join("runs", stem)


def _prepare_run_dir(run_dir: str):
  try:
    os.makedirs(run_dir, exist_ok=True)
    probe = os.path.join(run_dir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("")
    os.remove(probe)
  except OSError as e:
    raise loop.RunError(f"run directory {run_dir} is not writable: {e.strerror}") from None


def _saved_config(args) -> tuple[config.RunConfig, str]:
  """The config of an existing run (--run-dir), or of --config."""
  if args.run_dir and os.path.exists(os.path.join(args.run_dir, "config.yaml")):
    return config.load_config(os.path.join(args.run_dir, "config.yaml"), args.overrides), \
        args.run_dir
  if args.config:
    cfg = config.load_config(args.config, args.overrides)
    return cfg, _run_dir(args, args.config)
  where = args.run_dir or "(none given)"
  raise loop.RunError(f"run directory {where} holds no config.yaml; give --run-dir of a run "
                      f"started with `run.py train`, or --config FILE")


def _load_adapter(s: loop.Setup, required: bool = True):
  import jax
  from jax_it import lora
  if not os.path.isdir(os.path.join(s.run_dir, "checkpoints")):
    if required:
      raise loop.RunError(f"{s.run_dir} has no checkpoint yet; train first")
    return None
  ckpt = checkpoint.Checkpointer(s.run_dir, async_save=False)
  try:
    if ckpt.latest_step() is None:
      if required:
        raise loop.RunError(f"{s.run_dir} has no checkpoint yet; train first")
      return None
    template = lora.init(jax.random.key(0), s.mcfg, s.lcfg)
    adapter, _ = ckpt.restore_lora(template, loop.identity(s))
    return adapter
  finally:
    ckpt.close()


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_train(args) -> int:
  import jax
  from jax_it import evaluate
  path = args.config or os.path.relpath(_default_config())
  cfg = config.load_config(path, args.overrides)
  run_dir = _run_dir(args, path)
  _prepare_run_dir(run_dir)
  print(f"run directory: {run_dir}", flush=True)
  s = loop.setup(cfg, run_dir)
  saved = os.path.join(run_dir, "config.yaml")
  if not os.path.exists(saved) and jax.process_index() == 0:
    config.save_config(cfg, saved)
  print(f"model: {cfg.model.path} ({s.mcfg.family}, {s.mcfg.num_layers} layers), train records: "
        f"{len(s.splits['train'])}, held out: {len(s.splits['test'])}", flush=True)
  summary = loop.train_loop(s, progress=not args.no_progress)
  if cfg.report.eval_samples and s.splits["test"]:
    result = evaluate.compare(s, summary["adapter"], s.splits["test"], cfg.report.eval_samples)
    if jax.process_index() == 0:  # every process computes, one writes
      print(evaluate.write(result, run_dir, cfg.report.show))
  return 0


def cmd_eval(args) -> int:
  from jax_it import evaluate
  cfg, run_dir = _saved_config(args)
  s = loop.setup(cfg, run_dir)
  adapter = _load_adapter(s)
  records = s.splits["test"]
  if args.data:
    records = data.load_records(data.DataConfig(path=args.data, fields=s.dcfg.fields))
  n = cfg.report.eval_samples or len(records)
  result = evaluate.compare(s, adapter, records, n)
  print(evaluate.write(result, run_dir, cfg.report.show))
  return 0


def cmd_generate(args) -> int:
  from jax_it import evaluate
  if not args.prompt:
    raise loop.RunError("generate needs --prompt TEXT")
  cfg, run_dir = _saved_config(args)
  s = loop.setup(cfg, run_dir)
  adapter = _load_adapter(s)
  record = {"instruction": args.prompt, "input": args.input, "output": ""}
  for name, a in ((("base", None),) if args.base else ()) + (("tuned", adapter),):
    text, stopped = evaluate.responses(s, [record], a)[0]
    print(f"[{name}{'' if stopped else ', no EOS'}] {text}")
  return 0


def cmd_export(args) -> int:
  from jax_it import lora
  if not args.out:
    raise loop.RunError("export needs --out DIR")
  cfg, run_dir = _saved_config(args)
  # merging needs the float base, also for runs that trained on an int8 one
  cfg.model.quant = "none"
  s = loop.setup(cfg, run_dir)
  adapter = _load_adapter(s)
  lora.save_peft(adapter, s.mcfg, args.out, base_model=cfg.model.path)
  print(f"PEFT adapter written to {args.out}")
  if args.merged:
    merged_dir = os.path.join(args.out, "merged")
    from jax_it import export
    export.save_hf(lora.merge(s.params, adapter), s.mcfg, merged_dir, tokenizer=s.tokenizer)
    print(f"merged Hugging Face model written to {merged_dir}")
  return 0


def cmd_compare(args) -> int:
  from jax_it import compare
  cfg, run_dir = _saved_config(args) if (args.run_dir or args.config) else (
      config.load_config(_default_config(), args.overrides), _run_dir(args, None))
  s = loop.setup(cfg, run_dir)
  adapter = _load_adapter(s, required=False)
  report = compare.against_torch(s, adapter)
  print(compare.format_report(report))
  return 0 if report["ok"] else 1


def _default_config() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "default.yaml")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "export": cmd_export,
            "compare": cmd_compare}
