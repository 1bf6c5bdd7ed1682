"""The data-parallel LoRA train step: its config, batches, loss, optimizer and placement."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_it import loss, model, schema
from jax_it.lora import Lora
from jax_it.model import ModelConfig, Params

DATA_AXIS = "data"
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_idx", "loss_w")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The `train` section: optimizer, schedule, batch layout and loop cadence."""

  SECTION: ClassVar[str] = "train"
  batch_size: int = schema.field(8, check=schema.POSITIVE)  # global: all devices, micro-batches
  micro_batches: int = schema.field(1, check=schema.POSITIVE)  # gradient accumulation steps
  epochs: int = schema.field(1, check=schema.POSITIVE)
  max_steps: int = schema.field(0, check=schema.NON_NEGATIVE)  # 0: the epochs decide
  lr: float = schema.field(2e-4, check=schema.POSITIVE)
  warmup_steps: int = schema.field(0, check=schema.NON_NEGATIVE)
  warmup_ratio: float = schema.field(0.0, check=schema.FRACTION)  # used when warmup_steps is 0
  schedule: str = schema.field("linear", choices=("linear", "cosine", "constant"))
  weight_decay: float = schema.field(0.0, check=schema.NON_NEGATIVE)
  clip_norm: float = schema.field(1.0, check=schema.NON_NEGATIVE)  # 0: no clipping
  b1: float = schema.field(0.9, check=schema.FRACTION)
  b2: float = schema.field(0.999, check=schema.FRACTION)
  eps: float = schema.field(1e-8, check=schema.POSITIVE)
  seed: int = schema.field(0, check=schema.SEED)  # LoRA dropout keys
  # "data": replicated base, shard_map over 'data'; "sharded": base sharded over devices (GSPMD)
  parallel: str = schema.field("data", choices=("data", "sharded"))
  loss_chunk: int = schema.field(512, check=schema.POSITIVE)  # rows of logits formed at once
  log_every: int = schema.field(1, check=schema.POSITIVE)
  eval_every: int = schema.field(0, check=schema.NON_NEGATIVE)  # 0: only at the last step
  eval_batches: int = schema.field(0, check=schema.NON_NEGATIVE)  # 0: the whole split

  def __post_init__(self):
    schema.validate(self)

  def check(self):
    if self.batch_size % self.micro_batches:
      raise schema.error("train", "micro_batches", self.micro_batches,
                         f"a divisor of train.batch_size={self.batch_size}")


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
  return _capacity((np.asarray(batch["loss_mask"]) > 0).sum(1), groups,
                   np.asarray(batch["loss_mask"]).shape[1], multiple)


def _capacity(row_counts: np.ndarray, groups: int, length: int, multiple: int) -> int:
  """The largest group's loss-token count rounded up to `multiple`, at most its positions."""
  per_group = np.asarray(row_counts).reshape(groups, -1)
  most = max(int(per_group.sum(1).max()), 1)
  return min(per_group.shape[1] * length, -(-most // multiple) * multiple)


def prepare_batch(batch: dict, mesh: jax.sharding.Mesh, micro_batches: int = 1,
                  multiple: int = 64) -> dict:
  """Loss index for this process's rows, then placement. All processes agree on the loss
  capacity C and the row length: a training batch carries its global rows' loss counts (see
  data.train_dataset), so C is computed alike everywhere; other batches (evaluation) agree
  through one allgather, pad-mode rows padded to the longest process's, with positions that
  reach no loss and no attention."""
  groups = len(mesh.local_devices) * micro_batches
  if "batch_loss_counts" in batch:  # a training batch knows its global rows: no collective
    cap = _capacity(batch["batch_loss_counts"], mesh.devices.size * micro_batches,
                    np.asarray(batch["tokens"]).shape[1], multiple)
  else:
    cap = loss_capacity(batch, groups, multiple)
  if jax.process_count() > 1 and "batch_loss_counts" not in batch:
    from jax.experimental import multihost_utils
    length = np.asarray(batch["tokens"]).shape[1]
    cap, most = (int(v) for v in np.max(multihost_utils.process_allgather(
        np.asarray([cap, length], np.int32)), axis=0))
    if most > length:
      batch = {k: np.pad(np.asarray(batch[k]), ((0, 0), (0, most - length)))
               for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
  return shard_batch(add_loss_index(batch, groups, multiple, cap), mesh)


# ---------------------------------------------------------------------------------------------
# Loss


def loss_sum(lora: Lora | None, params: Params, batch: dict, cfg: ModelConfig,
             tcfg: TrainConfig = TrainConfig(), dropout_key=None, remat: bool = False):
  """(sum of NLL over the batch's loss positions, their count) for one micro-batch."""
  hidden = model.hidden_states(params, batch["tokens"], cfg, lora=lora,
                               positions=batch["positions"], segment_ids=batch["segment_ids"],
                               remat=remat, dropout_key=dropout_key)
  idx = batch["loss_idx"]  # [groups, C], flat positions within each group of rows
  groups, D = idx.shape[0], hidden.shape[-1]
  h = jnp.take_along_axis(hidden.reshape(groups, -1, D), idx[..., None], axis=1)
  targets = jnp.take_along_axis(batch["targets"].reshape(groups, -1), idx, axis=1)
  w = batch["loss_w"].astype(jnp.float32)
  # A table sharded over devices along V (parallel="sharded") is best multiplied whole: GSPMD
  # keeps each device on its own shard. Slicing it into blocks would move it across devices.
  block = None if tcfg.parallel == "sharded" else loss.VOCAB_BLOCK
  nll = loss.chunked_nll(params, h.reshape(-1, h.shape[-1]), targets.reshape(-1), w.reshape(-1),
                         cfg, tcfg.loss_chunk, block)
  return nll, jnp.sum(w)


def mean_loss(lora, params, batch, cfg, tcfg: TrainConfig = TrainConfig(), remat: bool = False):
  """Mean NLL per loss token (evaluation; no dropout)."""
  nll, n = loss_sum(lora, params, batch, cfg, tcfg, remat=remat)
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


def optimizer(tcfg: TrainConfig, steps: int):
  """(AdamW with the section's schedule and clipping, the schedule) for a run of `steps`."""
  warmup = tcfg.warmup_steps or int(round(tcfg.warmup_ratio * steps))
  schedule = make_schedule(tcfg.lr, steps, warmup, tcfg.schedule)
  return make_optimizer(schedule, tcfg.weight_decay, tcfg.clip_norm or None, tcfg.b1, tcfg.b2,
                        tcfg.eps), schedule


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


def _grad_sums(lora, params, batch, key, cfg, tcfg, remat, devices=1):
  """Summed (not averaged) LoRA gradients, NLL and token count over the micro-batches."""
  micro = _split_micro(batch, tcfg.micro_batches, devices)
  keys = jax.random.split(key, tcfg.micro_batches)

  def body(carry, xs):
    g_acc, nll_acc, n_acc = carry
    b, k = xs
    (nll, n), g = jax.value_and_grad(loss_sum, has_aux=True)(lora, params, b, cfg, tcfg, k,
                                                             remat)
    return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

  zeros = jax.tree.map(jnp.zeros_like, lora)
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  (g, nll, n), _ = jax.lax.scan(body, init, (micro, keys))
  return g, nll, n


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None, tcfg: TrainConfig = TrainConfig(),
                    remat: bool = False):
  """Build `train_step(lora, opt_state, params, batch, key=None) -> (lora, opt_state, metrics)`.

  The loss is the mean over every loss token of the global batch: per-device NLL sums and
  token counts are summed over the 'data' axis (psum) and divided once, so the result does not
  depend on how the batch is split over devices or micro-batches. lora and opt_state are donated.
  """
  mesh = make_mesh() if mesh is None else mesh
  if tcfg.parallel == "data":
    def per_device(lora, params, batch, key):
      key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
      g, nll, n = _grad_sums(lora, params, batch, key, cfg, tcfg, remat)
      return jax.lax.psum((g, nll, n), DATA_AXIS)

    # check_vma off: the accumulators start replicated and become per-device inside the scans;
    # the explicit psum makes the outputs replicated again.
    grad_sums = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS), P()),
                              out_specs=P(), check_vma=False)
  elif tcfg.parallel == "sharded":
    grad_sums = functools.partial(_grad_sums, cfg=cfg, tcfg=tcfg, remat=remat,
                                  devices=mesh.devices.size)
  else:
    raise ValueError(f"unknown parallel mode {tcfg.parallel!r}; expected 'data' or 'sharded'")

  def step(lora, opt_state, params, batch, key):
    g, nll, n = grad_sums(lora, params, batch, key)
    n = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda x: x / n, g)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    metrics = {"loss": nll / n, "tokens": n, "grad_norm": optax.tree.norm(grads),
               "weights_finite": jnp.isfinite(optax.tree.norm(lora)).astype(jnp.float32)}
    return lora, opt_state, metrics

  # outputs replicated: the next step gets the placement it was compiled for (sharded mode would
  # otherwise hand back LoRA weights sharded like the base, recompile and not reuse the buffers)
  jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=NamedSharding(mesh, P()))

  def train_step(lora, opt_state, params, batch, key=None):
    key = jax.random.key(0) if key is None else key
    return jitted(lora, opt_state, params, batch, key)

  train_step.jitted = jitted  # run/plan.py lowers it; the first call then reuses that compile
  return train_step


# ---------------------------------------------------------------------------------------------
# Placement


def replicate(tree, mesh: jax.sharding.Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def param_shardings(params, mesh: jax.sharding.Mesh):
  """Each base tensor's sharding for parallel="sharded": along its largest axis divisible by the
  device count (never the stacked layer axis), replicated where none divides. `params` may be
  arrays or shapes (jax.ShapeDtypeStruct)."""
  n = mesh.devices.size

  def spec(path, x):
    skip_first = any(getattr(k, "key", None) == "layers" for k in path)
    axes = [a for a in range(int(skip_first), x.ndim) if x.shape[a] % n == 0]
    if not axes:
      return NamedSharding(mesh, P())
    best = max(axes, key=lambda a: x.shape[a])
    return NamedSharding(mesh, P(*[DATA_AXIS if a == best else None for a in range(x.ndim)]))

  return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(params: Params, mesh: jax.sharding.Mesh) -> Params:
  """The base params placed by param_shardings: each device holds a share of every tensor."""
  return jax.device_put(params, param_shardings(params, mesh))


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Place this process's rows of the global batch, split along the 'data' axis."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in BATCH_KEYS}
