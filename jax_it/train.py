"""Loss, optimizer and the data-parallel LoRA train step."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_it import model
from jax_it.lora import Lora
from jax_it.model import ModelConfig, Params

DATA_AXIS = "data"
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_idx", "loss_w")


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static knobs of the train step."""

  micro_batches: int = 1  # gradient accumulation: the global batch is split into this many parts
  loss_chunk: int = 512  # rows of the output projection computed at once
  remat: bool = False  # recompute each layer in the backward pass instead of storing it
  parallel: str = "data"  # "data": replicated base, shard_map over 'data'; "sharded": GSPMD


# ---------------------------------------------------------------------------------------------
# Batches


def add_loss_index(batch: dict, groups: int = 1, multiple: int = 64,
                   capacity: int | None = None) -> dict:
  """Add flat indices of the loss positions, so only those reach the output projection.

  The rows are cut into `groups` runs of consecutive rows (one per device and micro-batch, in
  that order); loss_idx [groups, C] indexes each group's flattened [rows * T] positions, padded
  with 0 and weight 0 in loss_w [groups, C]. C is the largest group's count rounded up to
  `multiple` (few distinct shapes, few recompiles).
  """
  mask = np.asarray(batch["loss_mask"]) > 0
  B, T = mask.shape
  if B % groups:
    raise ValueError(f"a batch of {B} rows does not split into {groups} device/micro-batch groups")
  flat = mask.reshape(groups, (B // groups) * T)
  if capacity is None:
    capacity = loss_capacity(batch, groups, multiple)
  idx = np.zeros((groups, capacity), np.int32)
  w = np.zeros((groups, capacity), np.float32)
  for g in range(groups):
    pos = np.flatnonzero(flat[g])[:capacity]
    idx[g, :len(pos)] = pos
    w[g, :len(pos)] = 1.0
  out = {k: np.asarray(batch[k], np.int32) for k in ("tokens", "targets", "positions",
                                                     "segment_ids")}
  return dict(out, loss_idx=idx, loss_w=w)


def loss_capacity(batch: dict, groups: int = 1, multiple: int = 64) -> int:
  mask = np.asarray(batch["loss_mask"]) > 0
  per_group = mask.reshape(groups, -1)
  most = max(int(per_group.sum(1).max()), 1)
  return min(per_group.shape[1], -(-most // multiple) * multiple)


def prepare_batch(batch: dict, mesh: jax.sharding.Mesh, micro_batches: int = 1,
                  multiple: int = 64) -> dict:
  """Loss index for this process's rows, then placement; all processes agree on C."""
  groups = len(mesh.local_devices) * micro_batches
  cap = loss_capacity(batch, groups, multiple)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    cap = int(np.max(multihost_utils.process_allgather(np.int32(cap))))
  return shard_batch(add_loss_index(batch, groups, multiple, cap), mesh)


# ---------------------------------------------------------------------------------------------
# Loss


VOCAB_BLOCK = 2048  # vocabulary rows per step of the loss: a [rows, 2048] block stays in cache


def _nll_and_dh(params, h, targets, weights, cfg, vocab_block):
  """Weighted NLL sum of a chunk and its gradient w.r.t. h, in one pass over the vocabulary.

  With z = h T^T (times the per-row scales of an int8 table) and logits = softcap(z), the
  gradient is dh = sum_v w (p_v - [v = t]) J_v T_v, where J_v = d logit_v / d (h . T_v) holds
  the row's int8 scale and the soft-cap derivative. The vocabulary is walked in blocks of
  `vocab_block` rows (None: all of it at once) with a running max m and sum s (rescaled when m grows), accumulating
  A = sum_{v != t} exp(logit_v - m) J_v T_v, so no [rows, V] array exists and both matmuls
  run on cache-sized blocks. The target's term (exp(logit_t - m) - s) J_t T_t is added in
  float32 at the end: a confident target's small p_t - 1 keeps its relative precision when the
  blocks' matmuls run in bfloat16. dh = (A + that term) w / s.

  The table comes as model._to_bits gives it (bfloat16 as uint16): XLA's CPU backend turns a
  slice of a bfloat16 array into float32, and would hoist a float32 copy of the whole table out
  of the loop.
  """
  emb = params["embedder"]
  bits, scale = emb["input_embedding"], emb.get("input_embedding_scale")
  cap = cfg.final_logit_soft_cap
  mm = h.dtype if cfg.matmul_dtype is None else jnp.dtype(cfg.matmul_dtype)  # matmul inputs
  # Tied to h, the table is no loop invariant of the enclosing scans: JAX's scan partial
  # evaluation would otherwise hoist every block's slice out of them as one stacked copy.
  bits, hm = jax.lax.optimization_barrier((bits, h.astype(mm)))
  R, D = h.shape
  V = bits.shape[0]
  f32 = jnp.float32

  def block(carry, start, size):
    m, s, acc, logit_t = carry
    t_b = model._from_bits(jax.lax.dynamic_slice_in_dim(bits, start, size)).astype(mm)
    z = jnp.einsum("RD,VD->RV", hm, t_b, preferred_element_type=f32)
    if scale is not None:
      s_b = jax.lax.dynamic_slice_in_dim(scale, start, size)[:, 0].astype(f32)
      z = z * s_b
    logits = model.soft_cap(z, cap)
    is_t = (start + jnp.arange(size, dtype=targets.dtype))[None, :] == targets[:, None]
    logit_t = logit_t + jnp.sum(jnp.where(is_t, logits, 0.0), axis=-1)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    rescale = jnp.exp(m - m_new)
    e = jnp.exp(logits - m_new[:, None])
    s = s * rescale + jnp.sum(e, axis=-1)
    if cap is not None:  # d softcap(z)/dz = 1 - tanh(z / cap)^2
      e = e * (1.0 - jnp.square(logits / cap))
    if scale is not None:
      e = e * s_b
    e = jnp.where(is_t, 0.0, e).astype(mm)  # the target's term is added in float32 below
    acc = acc * rescale[:, None] + jnp.einsum("RV,VD->RD", e, t_b, preferred_element_type=f32)
    return m_new, s, acc, logit_t

  carry = (jnp.full((R,), -jnp.inf, f32), jnp.zeros((R,), f32), jnp.zeros((R, D), f32),
           jnp.zeros((R,), f32))
  size = V if vocab_block is None else min(vocab_block, V)
  full = V // size
  carry, _ = jax.lax.scan(lambda c, i: (block(c, i * size, size), None), carry,
                          jnp.arange(full))
  if V % size:  # the last, shorter block
    carry = block(carry, full * size, V % size)
  m, s, acc, logit_t = carry
  g_t = jnp.exp(logit_t - m) - s
  if cap is not None:
    g_t = g_t * (1.0 - jnp.square(logit_t / cap))
  t_t = model._from_bits(bits[targets]).astype(f32)
  if scale is not None:
    g_t = g_t * scale[targets, 0].astype(f32)
  dh = (acc + g_t[:, None] * t_t) * (weights / s)[:, None]
  nll = jnp.sum((m + jnp.log(s) - logit_t) * weights)
  return nll, dh.astype(h.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunk_nll(params, h, targets, weights, cfg, vocab_block):
  return _nll_and_dh(params, h, targets, weights, cfg, vocab_block)[0]


def _chunk_nll_fwd(params, h, targets, weights, cfg, vocab_block):
  # The input gradient is formed in the forward pass, so the backward pass needs neither the
  # [chunk, V] logits nor a second pass over the output projection.
  nll, dh = _nll_and_dh(params, h, targets, weights, cfg, vocab_block)
  return nll, dh


def _chunk_nll_bwd(cfg, vocab_block, dh, g):
  del cfg, vocab_block
  return None, dh * g.astype(dh.dtype), None, None  # the base params are frozen


_chunk_nll.defvjp(_chunk_nll_fwd, _chunk_nll_bwd)


def chunked_nll(params: Params, h: jax.Array, targets: jax.Array, weights: jax.Array,
                cfg: ModelConfig, chunk: int, vocab_block: int | None) -> jax.Array:
  """Sum of weighted next-token NLL over rows of h [R, D], `chunk` rows of logits at a time.

  Each chunk's logits live only inside its own forward step (see _chunk_nll), one
  [chunk, vocab_block] block at a time (None: [chunk, V]); each chunk reads the table once.
  """
  R, D = h.shape
  n = -(-R // chunk)  # as many chunks as `chunk` asks for, then equal sizes: 640 rows with
  chunk = -(-R // n)  # chunk=512 run as 2 x 320, not 2 x 512 with 384 rows of padding
  pad = n * chunk - R
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
  emb = params["embedder"]
  table = emb["input_embedding"]
  if cfg.matmul_dtype is not None and table.dtype != jnp.int8:  # round once, not per chunk
    table = table.astype(cfg.matmul_dtype)
  params = {"embedder": dict(emb, input_embedding=model._to_bits(table))}

  def body(total, xs):
    return total + _chunk_nll(params, *xs, cfg, vocab_block), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (h.reshape(n, chunk, D), targets.reshape(n, chunk),
                           weights.reshape(n, chunk)))
  return total


def loss_sum(lora: Lora | None, params: Params, batch: dict, cfg: ModelConfig,
             opts: StepOptions = StepOptions(), dropout_key=None):
  """(sum of NLL over the batch's loss positions, their count) for one micro-batch."""
  hidden = model.hidden_states(params, batch["tokens"], cfg, lora=lora,
                               positions=batch["positions"], segment_ids=batch["segment_ids"],
                               remat=opts.remat, dropout_key=dropout_key)
  idx = batch["loss_idx"]  # [groups, C], flat positions within each group of rows
  groups, D = idx.shape[0], hidden.shape[-1]
  h = jnp.take_along_axis(hidden.reshape(groups, -1, D), idx[..., None], axis=1)
  targets = jnp.take_along_axis(batch["targets"].reshape(groups, -1), idx, axis=1)
  w = batch["loss_w"].astype(jnp.float32)
  # A table sharded over devices along V (parallel="sharded") is best multiplied whole: GSPMD
  # keeps each device on its own shard. Slicing it into blocks would move it across devices.
  block = None if opts.parallel == "sharded" else VOCAB_BLOCK
  nll = chunked_nll(params, h.reshape(-1, h.shape[-1]), targets.reshape(-1), w.reshape(-1),
                    cfg, opts.loss_chunk, block)
  return nll, jnp.sum(w)


def mean_loss(lora, params, batch, cfg, opts: StepOptions = StepOptions()):
  """Mean NLL per loss token (evaluation; no dropout)."""
  nll, n = loss_sum(lora, params, batch, cfg, opts)
  return nll / jnp.maximum(n, 1.0)


# ---------------------------------------------------------------------------------------------
# Optimizer


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "linear"):
  """Warmup from 0, then linear or cosine decay to 0 at total_steps (or constant)."""
  decay_steps = max(total_steps - warmup_steps, 1)
  if kind == "linear":
    decay = optax.linear_schedule(lr, 0.0, decay_steps)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown schedule {kind!r}; expected linear, cosine or constant")
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(schedule, weight_decay: float = 0.0, clip_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
  """AdamW (decoupled weight decay, as torch.optim.AdamW) after global-norm clipping."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# The train step


def make_mesh(devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def _split_micro(batch: dict, m: int, devices: int) -> dict:
  """[devices * m * rows, ...] -> [m, devices * rows, ...]: micro-batch i takes group (d, i) of
  every device d, matching the groups of add_loss_index."""
  def split(x):
    x = x.reshape(devices, m, x.shape[0] // (devices * m), *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(m, -1, *x.shape[3:])
  return jax.tree.map(split, batch)


def _grad_sums(lora, params, batch, key, cfg, opts, devices=1):
  """Summed (not averaged) LoRA gradients, NLL and token count over the micro-batches."""
  micro = _split_micro(batch, opts.micro_batches, devices)
  keys = jax.random.split(key, opts.micro_batches)

  def body(carry, xs):
    g_acc, nll_acc, n_acc = carry
    b, k = xs
    (nll, n), g = jax.value_and_grad(loss_sum, has_aux=True)(lora, params, b, cfg, opts, k)
    return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

  zeros = jax.tree.map(jnp.zeros_like, lora)
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  (g, nll, n), _ = jax.lax.scan(body, init, (micro, keys))
  return g, nll, n


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None, opts: StepOptions = StepOptions()):
  """Build `train_step(lora, opt_state, params, batch, key=None) -> (lora, opt_state, metrics)`.

  The loss is the mean over every loss token of the global batch: per-device NLL sums and
  token counts are summed over the 'data' axis (psum) and divided once, so the result does not
  depend on how the batch is split over devices or micro-batches. lora and opt_state are donated.
  """
  mesh = make_mesh() if mesh is None else mesh
  if opts.parallel == "data":
    def per_device(lora, params, batch, key):
      key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
      g, nll, n = _grad_sums(lora, params, batch, key, cfg, opts)
      return jax.lax.psum((g, nll, n), DATA_AXIS)

    # check_vma off: the accumulators start replicated and become per-device inside the scans;
    # the explicit psum makes the outputs replicated again.
    grad_sums = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS), P()),
                              out_specs=P(), check_vma=False)
  elif opts.parallel == "sharded":
    grad_sums = functools.partial(_grad_sums, cfg=cfg, opts=opts, devices=mesh.devices.size)
  else:
    raise ValueError(f"unknown parallel mode {opts.parallel!r}; expected 'data' or 'sharded'")

  def step(lora, opt_state, params, batch, key):
    g, nll, n = grad_sums(lora, params, batch, key)
    n = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda x: x / n, g)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    metrics = {"loss": nll / n, "tokens": n, "grad_norm": optax.tree.norm(grads),
               "weights_finite": jnp.isfinite(optax.tree.norm(lora)).astype(jnp.float32)}
    return lora, opt_state, metrics

  jitted = jax.jit(step, donate_argnums=(0, 1))

  def train_step(lora, opt_state, params, batch, key=None):
    key = jax.random.key(0) if key is None else key
    return jitted(lora, opt_state, params, batch, key)

  return train_step


# ---------------------------------------------------------------------------------------------
# Placement


def replicate(tree, mesh: jax.sharding.Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_params(params: Params, mesh: jax.sharding.Mesh) -> Params:
  """Shard each base tensor along its largest axis divisible by the device count (never L)."""
  n = mesh.devices.size

  def spec(path, x):
    skip_first = any(getattr(k, "key", None) == "layers" for k in path)
    axes = [a for a in range(int(skip_first), x.ndim) if x.shape[a] % n == 0]
    if not axes:
      return NamedSharding(mesh, P())
    best = max(axes, key=lambda a: x.shape[a])
    return NamedSharding(mesh, P(*[DATA_AXIS if a == best else None for a in range(x.ndim)]))

  shardings = jax.tree_util.tree_map_with_path(spec, params)
  return jax.device_put(params, shardings)


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Place this process's rows of the global batch, split along the 'data' axis."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in BATCH_KEYS}
