"""The subcommands behind run.py; expected failures become one-line errors, never tracebacks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import traceback

from jax_it import config, data, weights
from jax_it.run import checkpoint, cluster, setup
from jax_it.run.lock import RunLock


class UsageError(ValueError):
  """A command line that misses what its command needs."""


EXPECTED = (config.ConfigError, data.DataError, weights.CheckpointError, setup.RunError,
            UsageError, checkpoint.CheckpointMismatch, cluster.ClusterError, FileNotFoundError,
            FileExistsError, PermissionError)


def run(args) -> int:
  try:
    cluster.initialize()
    return COMMANDS[args.command](args)
  except setup.Interrupted as e:
    print(f"\n{e}", file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    return 130
  except EXPECTED as e:
    print(f"error: {e}", file=sys.stderr)
    cluster.fail(f"error: {e}", 2)  # in a multi-process run: the others stop too, at once
    return 2
  except Exception as e:
    i, n = cluster.process() if cluster.joined() else (0, 1)
    if n > 1:  # the traceback here, its last line to every process, then all exit
      traceback.print_exc()
      line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      cluster.fail(f"{type(e).__name__}: {line} (traceback on process {i})", 1)
    raise


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


def agreed(args, cfg: config.RunConfig) -> config.RunConfig:
  """`cfg`, once every process of a multi-process run has the same command, options and
  resolved config (a one-line error naming the differing keys otherwise)."""
  options = {k: v for k, v in sorted(vars(args).items())
             if k not in ("config", "overrides", "no_progress")}
  cluster.agree("commands or configs", {"command line": options, **config.to_dict(cfg)})
  return cfg


def saved_config(args) -> tuple[config.RunConfig, str]:
  """The config of an existing run (--run-dir), or of --config."""
  if args.run_dir and os.path.exists(os.path.join(args.run_dir, "config.yaml")):
    cfg = config.load_config(os.path.join(args.run_dir, "config.yaml"), args.overrides)
    return agreed(args, cfg), args.run_dir
  if args.config:
    cfg = config.load_config(args.config, args.overrides)
    return agreed(args, cfg), run_dir_of(args, args.config)
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
  cfg = agreed(args, config.load_config(path, args.overrides))
  run_dir = run_dir_of(args, path)
  created = not os.path.exists(run_dir)
  lead = jax.process_index() == 0  # one writer per run directory (shared by all processes)
  if lead:  # the others find it there: orbax's multi-process checkpoints need one directory
    prepare_run_dir(run_dir)
  lock = RunLock(run_dir, enabled=lead)

  def remove_created():  # a failed start leaves no empty run directory behind
    if created and lead:
      lock.release()
      shutil.rmtree(run_dir, ignore_errors=True)

  undo = cluster.at_abort(remove_created)  # also when another process fails during the start
  try:
    print(f"run directory: {run_dir}", flush=True)
    try:
      ctx, steps = _start(cfg, run_dir, lead)
      cluster.sync("started")  # every process started: from here the run directory stays
    except BaseException:
      remove_created()
      raise
    undo()
    cluster.at_abort(lock.release)
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
  ctx = setup.make_context(cfg, run_dir, training=True)
  summary = setup.data_summary(ctx)
  # the same config can read other files on other hosts: the data must agree too
  cluster.agree("data", lambda: {"data summary": summary, "train records": setup.fingerprint(
      ctx.splits["train"])})
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


# the eval of open-ended records: a limit long enough to see whether a model stops
LONG_EVAL_TOKENS = 512


def cmd_eval(args) -> int:
  from jax_it import ifeval
  from jax_it.run import evaluate
  cfg, run_dir = trained_run(args)
  judge = _judge_of(args)  # its prompts read now: a missing file fails before the model loads
  records = None
  if args.data or args.ifeval:
    if not any(o.startswith("generate.max_new_tokens=") for o in args.overrides):
      cfg = dataclasses.replace(cfg, generate=dataclasses.replace(
          cfg.generate, max_new_tokens=LONG_EVAL_TOKENS))
  if args.data:  # read before the model loads: a bad file fails in a second, not after it
    where = dataclasses.replace(cfg.data, path=args.data)
    records = data.load_records(where, require_output=False)
    data.rendered(records, where)  # in the run's format, or an error naming the record
  elif args.ifeval:
    records = ifeval.generate(args.ifeval, cfg.data.seed, "eval")
  if cfg.generate.max_new_tokens == 0:  # said now, not after the model has loaded
    raise UsageError("eval generates responses, but generate.max_new_tokens=0; give a limit")
  ctx, adapter = with_adapter(cfg, run_dir)
  records = ctx.splits["test"] if records is None else records
  cluster.agree("evaluation records", lambda: {"records": setup.fingerprint(records)})
  n = cfg.report.eval_samples or len(records)
  result = evaluate.compare(ctx, adapter, records, n)  # every process computes, one writes
  if _lead():
    if judge:
      print(f"judging {result['generated']} records at {judge.url}", flush=True)
      result["judge"] = judge.evaluate(result["rows"])
    print(evaluate.write(result, run_dir, cfg.report.show))
  return 0


def _judge_of(args):
  """The judge client of --judge (None without it)."""
  from jax_it import judge
  url = getattr(args, "judge", None)  # namespaces built by hand may lack the judge options
  if not url:
    return None
  try:
    return judge.Judge(url, getattr(args, "judge_model", None),
                       score_prompt=getattr(args, "judge_prompt", None),
                       pair_prompt=getattr(args, "judge_pair_prompt", None))
  except judge.JudgeError as e:
    raise UsageError(str(e)) from None


def _lead() -> bool:
  """Process 0: in a multi-process run the one that writes files and prints results."""
  import jax
  return jax.process_index() == 0


def cmd_generate(args) -> int:
  from jax_it.run import evaluate
  if not args.prompt:
    raise UsageError("generate needs --prompt TEXT")
  ctx, adapter = with_adapter(*trained_run(args))
  record = {"instruction": args.prompt, "input": args.input, "output": ""}
  for name, a in ((("base", None),) if args.base else ()) + (("tuned", adapter),):
    text, stopped = evaluate.responses(ctx, [record], a)[0]
    if _lead():
      print(f"[{name}{'' if stopped else ', no EOS'}] {text}")
  return 0


def cmd_export(args) -> int:
  from jax_it import lora
  if not args.out:
    raise UsageError("export needs --out DIR")
  cfg, run_dir = trained_run(args)
  gguf = getattr(args, "gguf", False)  # namespaces built by hand may lack the GGUF options
  if gguf:
    _check_gguf_quant(cfg, run_dir)
  # merging needs the float base, also for runs that trained on an int8 one
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant="none"))
  ctx, adapter = with_adapter(cfg, run_dir)
  if gguf:  # a family or config the file cannot describe fails before anything is written
    from jax_it.ckpt import gguf_write
    gguf_write.check(ctx.mcfg, args.gguf_type)
  if _lead():
    lora.save_peft(adapter, ctx.mcfg, args.out, base_model=cfg.model.path)
    print(f"PEFT adapter written to {args.out}")
  if not (args.merged or gguf):
    return 0
  merged = lora.merge(ctx.params, adapter)  # computed by every process, written by one
  import jax
  if jax.process_count() > 1:  # sharded params: each host holds a part; gather them whole
    from jax.experimental import multihost_utils
    merged = multihost_utils.process_allgather(merged, tiled=True)
  if not _lead():
    return 0
  if args.merged:
    from jax_it.ckpt import hf
    merged_dir = os.path.join(args.out, "merged")
    hf.save_hf(merged, ctx.mcfg, merged_dir, tokenizer=_with_chat_template(ctx))
    print(f"merged Hugging Face model written to {merged_dir}")
  if gguf:
    path = _save_gguf(ctx, merged, args.out, args.gguf_type)
    print(f"merged GGUF model written to {path}")
  return 0


def _check_gguf_quant(cfg: config.RunConfig, run_dir: str):
  """A run tuned on a quantized base is refused before any model loads: its adapter learned to
  correct that base, and merged into the float one it is not the model that was evaluated."""
  if cfg.model.quant != "none":
    raise UsageError(
        f"export --gguf: {run_dir}/config.yaml has model.quant={cfg.model.quant!r}; GGUF export "
        "supports model.quant=none (the adapter was tuned on the quantized base); add the "
        "override model.quant=none to merge it into the float base anyway")


def _save_gguf(ctx, merged, out: str, gguf_type: str) -> str:
  """OUT/model-<type>.gguf: the tokenizer copied from the base's GGUF file when it is one (the
  exact fields llama.cpp wrote), else rebuilt from the transformers tokenizer."""
  from pathlib import Path

  from jax_it.ckpt import gguf as ckpt_gguf
  from jax_it.ckpt import gguf_write
  source = setup.checkpoint_path(ctx.cfg.model)
  if source.startswith("random:"):  # random models borrow the packaged tokenizer
    source = setup.packaged_gemma_path()
  base_gguf = ckpt_gguf.find(Path(source))
  vocab = (gguf_write.vocab_from_gguf(base_gguf) if base_gguf is not None
           else gguf_write.vocab_from_hf(ctx.tokenizer))
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f"model-{gguf_type}.gguf")
  gguf_write.save_gguf(merged, ctx.mcfg, path, vocab, gguf_type=gguf_type,
                       chat_template=_with_chat_template(ctx).chat_template,
                       name=os.path.basename(os.path.normpath(ctx.run_dir)))
  return path


def _with_chat_template(ctx):
  """The tokenizer to ship with a merged model: a run tuned in Gemma's chat format gets Gemma's
  published chat template, so runtimes prompt it in the format it learned."""
  from jax_it import templates
  if not isinstance(data.template_of(ctx.cfg.data), templates.ChatTemplate):
    return ctx.tokenizer
  import copy
  tok = copy.copy(ctx.tokenizer)
  tok.chat_template = templates.GEMMA_CHAT_TEMPLATE
  return tok


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
  if _lead():
    print(compare.format_report(report))
  return 0 if report["ok"] else 1


def cmd_plan(args) -> int:
  """The memory plan of training --config (default configs/default.yaml) per device, without
  loading weights where the shapes are known; exit 1 when it does not fit."""
  import jax

  from jax_it import train
  from jax_it.run import plan
  path = args.config or os.path.relpath(default_config())
  cfg = agreed(args, config.load_config(path, args.overrides))
  setup.check_devices(cfg)
  mesh = train.make_mesh()
  p = plan.memory_plan(cfg, plan.model_config(cfg.model), mesh)
  if jax.process_index() == 0:
    print(f"{path}: model {cfg.model.path}, global batch {cfg.train.batch_size} x "
          f"{cfg.data.max_len} tokens, worst case (every position in the loss)")
    print(plan.format_plan(p))
  return 1 if p["fits"] is False else 0


def cmd_chat(args) -> int:
  """A conversation with the run's tuned model in the terminal (one process)."""
  from jax_it.run import chat
  if cluster.joined() and cluster.process()[1] > 1:
    raise UsageError("chat reads the terminal: run it as one process")
  ctx, adapter = with_adapter(*trained_run(args))
  return chat.repl(ctx, adapter, system=args.system)


def cmd_serve(args) -> int:
  """The run's base and tuned model behind an OpenAI-compatible API until interrupted."""
  if cluster.joined() and cluster.process()[1] > 1:
    raise UsageError("serve runs as one process")
  if args.max_tokens < 1:
    raise UsageError(f"--max-tokens={args.max_tokens}: expected at least 1")
  from jax_it.run import serve
  cfg, run_dir = trained_run(args)
  sock = serve.bind(args.host, args.port)  # before the model loads: a busy port fails at once
  try:
    ctx, adapter = with_adapter(cfg, run_dir)
    return serve.serve(ctx, adapter, sock, serve.Limits(max_tokens=args.max_tokens))
  finally:
    sock.close()


def cmd_data(args) -> int:
  """What training will see of --config's data (default configs/default.yaml); no weights."""
  from jax_it.run import preview
  path = args.config or os.path.relpath(default_config())
  cfg = config.load_config(path, args.overrides)
  color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
  if _lead():
    print(preview.preview(cfg, show=args.show, color=color))
  return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "export": cmd_export,
            "compare": cmd_compare, "plan": cmd_plan, "chat": cmd_chat, "data": cmd_data,
            "serve": cmd_serve}
