"""LoRA adapters beside the frozen base: config, init, the delta in each projection, merge, PEFT.

The delta of a projection is derived from the projection's own einsum (families.PROJECTIONS):
A contracts the same input axes as the base weight, B produces its output axes, so one rule
serves every projection and W + scale * B A is never formed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_it import ops, schema
from jax_it.families import ALL_LINEAR, PROJECTIONS, ModelConfig, Params, Projection, axis_sizes

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
  """The adapter: weights[target] = {'a': [L, *in, r], 'b': [L, r, *out]}, and its config."""

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

  A contracts what the base weight contracts, B produces the weight's other axes, r is the
  rank: "BTNH,NHD->BTD" (o) gives "BTNH,NHr->BTr" and "BTr,rD->BTD", written with the axes
  renamed a, b, c, ... in order of appearance ("abcd,cdr->abr", "abr,re->abe"): jnp.einsum
  contracts several axes in the sorted order of their names, so this contracts N before H, as
  they lie in memory; another order rounds differently in bfloat16 runs.
  """
  ins, out = eq.split("->")
  x, w = ins.split(",")
  contracted = "".join(a for a in w if a in x)
  produced = "".join(a for a in w if a not in x)
  lead = "".join(a for a in x if a not in contracted)
  names = dict(zip(x + produced, "abcdefghijklmnopq"))  # "r" stays the rank's
  x, contracted, produced, lead, out = ("".join(names[a] for a in s)
                                        for s in (x, contracted, produced, lead, out))
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
# PEFT adapter directories: written and read as peft.PeftModel does

_PEFT_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _peft_name(target: str, layer: int, which: str) -> str:
  return f"base_model.model.model.layers.{layer}.{PROJECTIONS[target].hf}.lora_{which}.weight"


def save_peft(adapter: Lora, cfg: ModelConfig, out_dir: str, base_model: str | None = None):
  """Write adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel."""
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  lc = adapter.cfg
  tensors = {}
  for target in lc.targets:
    ins, outs = io_shapes(target, cfg)
    a = np.asarray(adapter.weights[target]["a"], np.float32)
    b = np.asarray(adapter.weights[target]["b"], np.float32)
    for layer in range(cfg.num_layers):
      # PEFT: lora_A.weight [r, in], lora_B.weight [out, r], with flattened (head, dim) axes
      tensors[_peft_name(target, layer, "A")] = np.ascontiguousarray(
          a[layer].reshape(math.prod(ins), lc.r).T)
      tensors[_peft_name(target, layer, "B")] = np.ascontiguousarray(
          b[layer].reshape(lc.r, math.prod(outs)).T)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": lc.r, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
      "target_modules": list(lc.targets), "use_rslora": lc.rslora, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "modules_to_save": None, "layers_to_transform": None, "use_dora": False,
  }
  _atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                lambda p: save_file(tensors, p, metadata={"format": "pt"}))
  _atomic_write(os.path.join(out_dir, "adapter_config.json"),
                lambda p: open(p, "w").write(json.dumps(config, indent=2)))


def _atomic_write(path: str, write):
  """Write to a temporary name, then rename, so a crash never leaves a half-written file."""
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def _read_peft_config(adapter_dir: str) -> LoraConfig:
  path = os.path.join(adapter_dir, "adapter_config.json")
  if not os.path.exists(path):
    raise ValueError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
  with open(path) as f:
    pc = json.load(f)
  if pc.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{path}: peft_type {pc.get('peft_type')!r} is not supported; expected LORA")
  for key in ("use_dora", "layers_to_transform", "rank_pattern", "alpha_pattern",
              "modules_to_save"):
    if pc.get(key):
      raise ValueError(f"{path}: {key}={pc[key]!r} is not supported")
  if pc.get("bias", "none") != "none":
    raise ValueError(f"{path}: bias={pc['bias']!r} is not supported; expected 'none'")
  targets = pc["target_modules"]
  if isinstance(targets, str) and targets != "all-linear":
    raise ValueError(f"{path}: target_modules regex {targets!r} is not supported; give a list")
  return LoraConfig(r=int(pc["r"]), alpha=float(pc["lora_alpha"]),
                    dropout=float(pc.get("lora_dropout", 0.0)),
                    targets=tuple(targets) if isinstance(targets, list) else targets,
                    rslora=bool(pc.get("use_rslora", False)))


def load_peft(adapter_dir: str, cfg: ModelConfig, dtype=jnp.float32) -> Lora:
  """Read a PEFT LoRA adapter directory into the LoRA pytree."""
  from safetensors import safe_open

  lc = _read_peft_config(adapter_dir)
  path = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.exists(path):
    raise ValueError(f"{adapter_dir}: adapter_model.safetensors is missing")
  arrays = {t: {"a": [None] * cfg.num_layers, "b": [None] * cfg.num_layers} for t in lc.targets}
  with safe_open(path, framework="np") as f:
    for key in f.keys():
      m = _PEFT_KEY.search(key)
      if not m or m.group(3) not in arrays:
        raise ValueError(f"{path}: unexpected tensor {key!r} for targets {list(lc.targets)}")
      layer, target, which = int(m.group(1)), m.group(3), m.group(4)
      if layer >= cfg.num_layers:
        raise ValueError(f"{path}: tensor {key!r} is for layer {layer}; the model has "
                         f"{cfg.num_layers}")
      ins, outs = io_shapes(target, cfg)
      t = f.get_tensor(key).astype(np.float32)
      want = (lc.r, math.prod(ins)) if which == "A" else (math.prod(outs), lc.r)
      if t.shape != want:
        raise ValueError(f"{path}: {key} has shape {t.shape}, expected {want}")
      shaped = t.T.reshape(*ins, lc.r) if which == "A" else t.T.reshape(lc.r, *outs)
      arrays[target]["a" if which == "A" else "b"][layer] = shaped
  weights = {}
  for target, ab in arrays.items():
    missing = [i for i, x in enumerate(ab["a"] + ab["b"]) if x is None]
    if missing:
      raise ValueError(f"{path}: {target} is missing tensors for some layers")
    weights[target] = {k: jnp.asarray(np.stack(v), dtype) for k, v in ab.items()}
  return Lora(weights, lc)
