"""A training run's memory per device, from shapes alone: base, adapter, optimizer, step.

Every figure is per device, in bytes. The base params, LoRA weights and optimizer state come from
abstract shapes (jax.eval_shape; no weights need to load) and the shardings the run gives them;
the step's temporaries from XLA's own buffer assignment of the compiled train step where the
backend reports one ("compiled"), else from the residuals the backward pass keeps ("estimate").
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_it import config, families, lora, loss, model, quant, train

# ---------------------------------------------------------------------------------------------
# Abstract state


def model_config(section: config.ModelSection) -> model.ModelConfig:
  """model.path's ModelConfig, without loading weights where the shapes are known otherwise:
  random:<preset> (its table widened to the tokenizer's ids, as load_model does), the packaged
  Gemma 3 270M (its preset), a Hugging Face directory (config.json). Other checkpoints (GGUF or
  Flax files) are loaded."""
  from jax_it.run import setup
  path = section.path
  if path.startswith("random:") or path == setup.PACKAGED_GEMMA:
    name = path.split(":", 1)[1] if path.startswith("random:") else "gemma3-270m"
    if name not in families.PRESETS:
      raise setup.RunError(f"model.path={path!r}: unknown preset; expected one of "
                           f"{sorted(families.PRESETS)}")
    mcfg = families.PRESETS[name]
    if path.startswith("random:"):
      from jax_it import weights
      vocab = len(weights.load_tokenizer(setup.packaged_gemma_path()))
      mcfg = dataclasses.replace(mcfg, vocab_size=max(mcfg.vocab_size, vocab))
    return mcfg
  config_json = os.path.join(path, "config.json")
  if os.path.isfile(config_json):
    import json

    from jax_it.ckpt import hf
    with open(config_json) as f:
      d = json.load(f)
    return hf.hf_config_to_model(d, d["vocab_size"], config_json)
  return setup.load_model(section)[1]


def run_model_config(cfg: config.RunConfig, mcfg: model.ModelConfig) -> model.ModelConfig:
  """mcfg as setup.load_model hands it to the step: the model section's matmul and kernels."""
  matmul = None if cfg.model.matmul == "params" else cfg.model.matmul
  return dataclasses.replace(mcfg, matmul_dtype=matmul, kernels=cfg.model.kernels,
                             attention=cfg.model.attention)


def abstract_params(cfg: config.RunConfig, mcfg: model.ModelConfig, params=None):
  """Shapes and dtypes of the base params: of `params`, else as load_model would make them."""
  if params is not None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), mcfg, dtype))
  from jax_it.run import setup
  quantize = setup.quantizer(cfg.model, dtype)
  return shapes if quantize is None else jax.eval_shape(quantize, shapes)


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def quantize_peak(cfg: config.RunConfig, mcfg: model.ModelConfig) -> int:
  """Bytes while load_model quantizes (model.quant=int8 on the loading device, nf4 on the host
  when the run is on an accelerator: quantize_where), before the base is placed; 0 without.

  quant.quantize_int8 converts one matmul weight at a time (in families.PROJECTIONS' order, the
  embedding last) while the whole base in model.dtype stays alive: the peak is that base, the
  int8 weights done so far, and the weight in flight as XLA's float32 copy beside its int8 result.
  quant.quantize_nf4 (consume=True, as load_model calls it) deletes each float weight once
  converted and fills preallocated outputs one layer at a time: in flight are the weight's nf4
  output and one layer as its slice, a float32 copy and its codes; the embedding goes the same
  way in blocks of quant.EMBEDDING_ROWS rows. (A Gemma 2 2B gating weight measured 0.94 GB of
  RSS above its input; this counts 0.95 GB.)
  """
  if cfg.model.quant == "none":
    return 0
  base = abstract_params(dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, quant="none")), mcfg)
  quantized = abstract_params(cfg, mcfg)
  order = dict.fromkeys((p.block, p.param) for p in families.PROJECTIONS.values())
  alive, done, peak = nbytes(base), 0, 0
  for block, name in order:
    w = base["layers"][block][name]["w"]
    if cfg.model.quant == "int8":
      peak, done = max(peak, alive + done + 4 * w.size + w.size), done + w.size
    else:
      out, layer = nbytes(quantized["layers"][block][name]), w.size // w.shape[0]
      peak = max(peak, alive + done + out + (7 + w.dtype.itemsize) * layer)
      done, alive = done + out, alive - w.size * w.dtype.itemsize
  emb = base["embedder"]["input_embedding"]
  if cfg.model.quant == "int8":
    return max(peak, alive + done + 4 * emb.size + emb.size)
  rows = min(quant.EMBEDDING_ROWS, emb.shape[0]) * emb.shape[1]
  return max(peak, alive + done + nbytes(quantized["embedder"])
             + (5 + emb.dtype.itemsize) * rows)


def quantize_where(cfg: config.RunConfig, platform: str) -> str:
  """Where load_model quantizes: an nf4 base on the host unless the run is on CPU (setup's
  _loading_device), anything else on the loading device."""
  return "host" if cfg.model.quant == "nf4" and platform != "cpu" else "loading device"


def param_shardings(params, mesh: jax.sharding.Mesh, parallel: str):
  """The params' shardings: replicated, or for parallel="sharded" train.param_shardings'."""
  if parallel != "sharded":
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  return train.param_shardings(params, mesh)


def placed(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (one sharding or a matching tree)."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                                        weak_type=getattr(x, "weak_type", False)),
                      tree, shardings)


def abstract_batch(cfg: config.RunConfig, mesh: jax.sharding.Mesh,
                   capacity: int | None = None) -> dict:
  """The batch train.prepare_batch places: batch_size x max_len rows split over the 'data'
  axis, loss_idx/loss_w [groups, capacity]; capacity None: the worst case, every position in
  the loss (rows per group * max_len)."""
  B, T = cfg.train.batch_size, cfg.data.max_len
  groups = mesh.devices.size * cfg.train.micro_batches
  if B % groups:
    raise ValueError(f"train.batch_size={B} does not split into {groups} device/micro-batch "
                     "groups")
  C = B // groups * T if capacity is None else capacity
  shapes = {k: ((B, T), jnp.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
  shapes.update(loss_idx=((groups, C), jnp.int32), loss_w=((groups, C), jnp.float32))
  sharding = NamedSharding(mesh, P(train.DATA_AXIS))
  return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=sharding) for k in train.BATCH_KEYS}


def abstract_args(cfg: config.RunConfig, mcfg: model.ModelConfig, mesh: jax.sharding.Mesh,
                  optimizer, params=None, capacity: int | None = None) -> tuple:
  """(lora, opt_state, params, batch, key) as the loop passes them to the step, abstract."""
  base = abstract_params(cfg, mcfg, params)
  adapter = jax.eval_shape(
      lambda p: lora.init(jax.random.key(cfg.lora.seed), mcfg, cfg.lora, params=p), base)
  opt_state = jax.eval_shape(optimizer.init, adapter)
  replicated = NamedSharding(mesh, P())
  # the loop's key is uncommitted (jax.random.fold_in on the default device): no sharding, or
  # its first call would not match this lowering and compile again
  key = jax.eval_shape(lambda: jax.random.key(cfg.train.seed))
  return (placed(adapter, replicated), placed(opt_state, replicated),
          placed(base, param_shardings(base, mesh, cfg.train.parallel)),
          abstract_batch(cfg, mesh, capacity), key)


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  def one(x):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * x.dtype.itemsize
  return sum(one(x) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# The step's temporaries


def lower_step(step, args) -> jax.stages.Lowered:
  """The train step (train.make_train_step's) lowered for `args`: a later call with arrays of
  these shapes and shardings reuses the compile."""
  return step.jitted.lower(*args)


def compiled_memory(lowered: jax.stages.Lowered) -> dict | None:
  """XLA's per-device memory analysis of the compiled step, or None if the backend has none."""
  compiled = lowered.compile()
  try:
    stats = compiled.memory_analysis()
  except NotImplementedError:
    return None
  if stats is None:
    return None
  names = ("argument", "output", "alias", "temp", "generated_code")
  return {n: int(getattr(stats, f"{n}_size_in_bytes")) for n in names}


def estimate_temporaries(cfg: config.RunConfig, mcfg: model.ModelConfig, mesh, args) -> int:
  """What one device's micro-batch keeps for the backward pass (jax.vjp's residuals, base
  weights and inputs not counted), one block of logits and two gradient-sized buffers."""
  adapter, _, base, placed_batch, _ = args
  rows = cfg.train.batch_size // (mesh.devices.size * cfg.train.micro_batches)
  T, C = cfg.data.max_len, placed_batch["loss_idx"].shape[1]
  batch = {k: jax.ShapeDtypeStruct((rows, T), jnp.int32)
           for k in ("tokens", "targets", "positions", "segment_ids")}
  batch.update(loss_idx=jax.ShapeDtypeStruct((1, C), jnp.int32),
               loss_w=jax.ShapeDtypeStruct((1, C), jnp.float32))

  def pullback(ad, p, b):
    f = lambda a: train.loss_sum(a, p, b, mcfg, cfg.train, jax.random.key(0), cfg.model.remat)
    return jax.vjp(f, ad)[1]

  unplaced = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  residuals = jax.tree.leaves(jax.eval_shape(pullback, unplaced(adapter), unplaced(base), batch))
  inputs = [(x.shape, x.dtype) for x in jax.tree.leaves((adapter, base, batch))]
  kept = 0
  for x in residuals:  # a residual that is an input is not a new buffer
    if (x.shape, x.dtype) in inputs:
      inputs.remove((x.shape, x.dtype))
    else:
      kept += x.size * x.dtype.itemsize
  vocab = mcfg.vocab_size if cfg.train.parallel == "sharded" else loss.VOCAB_BLOCK
  logits = min(cfg.train.loss_chunk, C) * min(vocab, mcfg.vocab_size) * 4
  return kept + logits + 2 * device_bytes(adapter)


# ---------------------------------------------------------------------------------------------
# The plan


def device_memory(mesh: jax.sharding.Mesh) -> tuple[int, str]:
  """(bytes, "device") from this process's accelerator's allocator limit; on CPU (host memory
  divided over this process's devices, "host"), respecting a cgroup v2 limit; (0, "unknown")
  for an accelerator that reports no limit."""
  dev = mesh.local_devices[0]
  try:
    stats = dev.memory_stats()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "device"
  if dev.platform != "cpu":
    return 0, "unknown"
  return host_memory() // max(1, len(mesh.local_devices)), "host"


def host_memory() -> int:
  """This machine's memory, respecting a cgroup v2 limit."""
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  try:
    with open("/sys/fs/cgroup/memory.max") as f:
      limit = f.read().strip()
    host = min(host, int(limit)) if limit.isdigit() else host
  except OSError:
    pass
  return host


def memory_plan(cfg: config.RunConfig, mcfg: model.ModelConfig, mesh: jax.sharding.Mesh,
                params=None, *, step=None, capacity: int | None = None,
                compile_step: bool = True) -> dict:
  """Bytes per device of a run of `cfg`: base params, LoRA, optimizer state, batch, the step's
  temporaries; their total, the peak while load_model quantizes (model.quant=int8 or nf4, on
  the loading device or the host, before placement), the device's memory and whether both fit.

  params: the loaded base (its shapes and dtypes count), or None for the shapes load_model
  would give mcfg. step: the loop's train step (make_train_step); when it exposes `.jitted`, the
  loop's call with a batch of this shape reuses this compile. capacity: loss positions per
  device/micro-batch group (train.loss_capacity of a batch), None the worst case.
  compile_step=False: the temporaries estimated, nothing compiled.
  """
  mcfg = run_model_config(cfg, mcfg)
  optimizer, _ = train.optimizer(cfg.train, max(cfg.train.max_steps, 1))
  args = abstract_args(cfg, mcfg, mesh, optimizer, params, capacity)
  adapter, opt_state, base, batch, key = args
  plan = {"devices": mesh.devices.size, "platform": mesh.devices.flat[0].platform,
          "parallel": cfg.train.parallel, "params_dtype": cfg.model.dtype,
          "quant": cfg.model.quant, "base_params": device_bytes(base),
          "lora": device_bytes(adapter), "optimizer": device_bytes(opt_state),
          "batch": device_bytes(batch) + device_bytes(key)}
  stats = None
  if compile_step:
    if step is None:
      step = train.make_train_step(mcfg, optimizer, mesh, cfg.train, remat=cfg.model.remat)
    stats = compiled_memory(lower_step(step, args))
  if stats is not None:
    plan.update(temporaries=stats["temp"], outputs=stats["output"] - stats["alias"],
                temporaries_source="compiled", compiled=stats)
  else:
    plan.update(temporaries=estimate_temporaries(cfg, mcfg, mesh, args), outputs=0,
                temporaries_source="estimate")
  parts = ("base_params", "lora", "optimizer", "batch", "temporaries", "outputs")
  plan["total"] = sum(plan[k] for k in parts)
  plan["quantize_peak"] = quantize_peak(cfg, mcfg)
  plan["quantize_where"] = quantize_where(cfg, plan["platform"])
  plan["device_memory"], plan["device_memory_kind"] = device_memory(mesh)
  # None: the device does not say how much memory it has
  on_device = plan["quantize_peak"] if plan["quantize_where"] == "loading device" else 0
  plan["fits"] = (None if plan["device_memory_kind"] == "unknown"
                  else max(plan["total"], on_device) <= plan["device_memory"])
  if plan["quantize_where"] == "host" and plan["fits"] is not None:
    plan["fits"] = plan["fits"] and plan["quantize_peak"] <= host_memory()
  return plan


def _size(n: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def format_plan(plan: dict) -> str:
  """The plan as a short table, one line per component."""
  base = plan["params_dtype"] + ("" if plan["quant"] == "none" else f", {plan['quant']}")
  where = "host memory / devices" if plan["device_memory_kind"] == "host" else "device memory"
  fits = {True: "yes", False: "NO", None: "unknown"}[plan["fits"]]
  rows = [(f"base params ({base}, {plan['parallel']})", plan["base_params"]),
          ("LoRA weights", plan["lora"]), ("optimizer state", plan["optimizer"]),
          ("batch", plan["batch"]),
          (f"step temporaries ({plan['temporaries_source']})", plan["temporaries"])]
  if plan["outputs"]:
    rows.append(("step outputs not donated", plan["outputs"]))
  rows.append(("total", plan["total"]))
  if plan["quantize_peak"]:
    rows.append((f"while quantizing to {plan['quant']} ({plan['quantize_where']})",
                 plan["quantize_peak"]))
  if plan["device_memory_kind"] != "unknown":
    rows.append((where, plan["device_memory"]))
  head = f"memory per device ({plan['devices']} x {plan['platform']}):"
  lines = [head] + [f"  {name:<40} {_size(n):>11}" for name, n in rows]
  return "\n".join(lines + [f"  {'fits':<40} {fits:>11}"])
