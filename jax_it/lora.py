"""LoRA adapters as a pytree beside the frozen base: config, init, the delta in each projection, merge.

The delta of a projection is derived from the projection's own einsum (families.PROJECTIONS):
A contracts the same input axes as the base weight, B produces its output axes, so one rule
serves every projection and W + scale * B A is never formed. PEFT adapter files: peft_io.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from jax_it import ops, schema
from jax_it.families import ALL_LINEAR, PROJECTIONS, Projection, axis_sizes

if TYPE_CHECKING:
  from jax_it.model import ModelConfig, Params

ALL_LINEAR_NAME = "all-linear"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The `lora` section: LoRA hyper-parameters, named as in PEFT."""

  SECTION: ClassVar[str] = "lora"
  r: int = schema.field(8, check=schema.POSITIVE)
  alpha: float = schema.field(32.0, check=schema.POSITIVE)
  dropout: float = schema.field(0.0, check=schema.FRACTION)
  # names from families.ALL_LINEAR, or "all-linear" for all of them; kept in PEFT's order
  targets: tuple[str, ...] | str = schema.field(("q_proj", "v_proj"))
  rslora: bool = schema.field(False)  # scale by alpha / sqrt(r) instead of alpha / r
  seed: int = schema.field(0, check=schema.SEED)  # of A's random init

  def __post_init__(self):
    if self.targets == ALL_LINEAR_NAME:
      object.__setattr__(self, "targets", ALL_LINEAR)
    schema.validate(self)

  def check(self):
    t = self.targets
    if isinstance(t, str) or not t or len(set(t)) != len(t) or set(t) - set(ALL_LINEAR):
      raise schema.error("lora", "targets", t if isinstance(t, str) else list(t),
                         f"a non-empty list of distinct names from {', '.join(ALL_LINEAR)}, "
                         f"or {ALL_LINEAR_NAME!r}")
    object.__setattr__(self, "targets", tuple(t for t in ALL_LINEAR if t in self.targets))

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@flax.struct.dataclass
class Lora:
  """The adapter: weights[target] = {'a': [L, *in, r], 'b': [L, r, *out]}, plus its static config."""

  weights: dict
  cfg: LoraConfig = flax.struct.field(pytree_node=False)


def io_shapes(target: str, cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Input and output axes of a target projection, in the einsum layout of model.py."""
  proj, size = PROJECTIONS[target], axis_sizes(cfg)
  return tuple(size[a] for a in proj.in_axes), tuple(size[a] for a in proj.out_axes)


def init(key: jax.Array, cfg: ModelConfig, lcfg: LoraConfig, dtype=jnp.float32) -> Lora:
  """A as PEFT initialises it (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in))), B zero."""
  weights = {}
  for i, target in enumerate(lcfg.targets):
    ins, outs = io_shapes(target, cfg)
    bound = 1.0 / math.sqrt(math.prod(ins))
    a = jax.random.uniform(jax.random.fold_in(key, i), (cfg.num_layers, *ins, lcfg.r), dtype,
                           -bound, bound)
    weights[target] = {"a": a, "b": jnp.zeros((cfg.num_layers, lcfg.r, *outs), dtype)}
  return Lora(weights, lcfg)


# ---------------------------------------------------------------------------------------------
# Applying the adapter inside a layer


@dataclasses.dataclass(frozen=True)
class LayerAdapter:
  """One layer's LoRA weights plus what applying them needs (scale, dropout rate and key)."""

  weights: dict
  scale: float = 1.0
  dropout: float = 0.0
  key: jax.Array | None = None


@functools.cache
def lora_eqs(eq: str) -> tuple[str, str]:
  """The two einsums of the LoRA path of a base einsum: x A and (x A) B.

  "BTD,NDH->BTNH" (q) gives ("BTD,Dr->BTr", "BTr,rNH->BTNH"): A contracts what the base weight
  contracts, B produces the weight's other axes, r is the rank.
  """
  ins, out = eq.split("->")
  x, w = ins.split(",")
  contracted = "".join(a for a in w if a in x)
  produced = "".join(a for a in w if a not in x)
  lead = "".join(a for a in x if a not in contracted)
  return f"{x},{contracted}r->{lead}r", f"{lead}r,r{produced}->{out}"


def add_delta(y: jax.Array, x: jax.Array, proj: Projection, layer: LayerAdapter | None,
              matmul: str | None, kernels: str = "auto") -> jax.Array:
  """y + scale * (dropout(x) A) B when `layer` adapts `proj`, in x's dtype."""
  if layer is None or proj.name not in layer.weights:
    return y.astype(x.dtype)
  a, b = layer.weights[proj.name]["a"], layer.weights[proj.name]["b"]
  if layer.dropout > 0.0 and layer.key is not None:
    salt = list(PROJECTIONS).index(proj.name)
    keep = jax.random.bernoulli(jax.random.fold_in(layer.key, salt), 1.0 - layer.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - layer.dropout), 0).astype(x.dtype)
  eq_a, eq_b = lora_eqs(proj.eq)
  if matmul is None:  # in the adapter's dtype
    xa = ops.einsum(eq_a, x.astype(a.dtype), a, kernels=kernels)
    delta = ops.einsum(eq_b, xa, b, kernels=kernels) * layer.scale
    return y + delta.astype(y.dtype)
  xa = ops.einsum(eq_a, x, a, matmul, kernels=kernels)
  delta = ops.einsum(eq_b, xa, b, matmul, kernels=kernels)
  return (y + delta * layer.scale).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Merging


def delta(adapter: Lora, target: str) -> jax.Array:
  """scale * A B for every layer, laid out like the base weight: [L, *weight_axes]."""
  proj = PROJECTIONS[target]
  a, b = adapter.weights[target]["a"], adapter.weights[target]["b"]
  d = jnp.einsum(f"L{proj.in_axes}r,Lr{proj.out_axes}->L{proj.weight_axes}",
                 a.astype(jnp.float32), b.astype(jnp.float32))
  return d * adapter.cfg.scale


def merge(params: Params, adapter: Lora) -> Params:
  """Fold the adapter into a copy of the base params (for export); the input is not modified."""
  if "input_embedding_scale" in params["embedder"]:
    raise ValueError("merge needs float base params; load the model without quant=int8")
  layers = jax.tree.map(lambda x: x, params["layers"])
  for target in adapter.cfg.targets:
    proj = PROJECTIONS[target]
    block = layers[proj.block]
    w, d = block[proj.param]["w"], delta(adapter, target)
    if proj.part is None:
      w = (w.astype(jnp.float32) + d).astype(w.dtype)
    else:
      w = w.at[:, proj.part].set((w[:, proj.part].astype(jnp.float32) + d).astype(w.dtype))
    block[proj.param] = {"w": w}
  return dict(params, layers=layers)


# ---------------------------------------------------------------------------------------------
# PEFT adapter files (public here: lora.save_peft / lora.load_peft)


def save_peft(adapter: Lora, cfg: ModelConfig, out_dir: str, base_model: str | None = None):
  """Write adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel."""
  from jax_it import peft_io
  peft_io.save_peft(adapter, cfg, out_dir, base_model)


def load_peft(adapter_dir: str, cfg: ModelConfig, dtype=jnp.float32) -> Lora:
  """Read a PEFT LoRA adapter directory into the LoRA pytree."""
  from jax_it import peft_io
  return peft_io.load_peft(adapter_dir, cfg, dtype)
