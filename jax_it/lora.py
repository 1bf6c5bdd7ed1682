"""LoRA adapters beside the frozen base: config, init, the delta in each projection, merge, PEFT.

The delta of a projection is derived from the projection's own einsum (families.PROJECTIONS):
A contracts the same input axes as the base weight, B produces its output axes, so one rule
serves every projection and W + scale * B A is never formed for plain LoRA. DoRA (PEFT's
use_dora) adds a trained magnitude m per output feature and rescales the output by
m / ||W + scale * B A||, a norm that does need the dense W of each layer (`dense_weight`).
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
  # DoRA: a trained magnitude per output feature, as PEFT's use_dora (init needs the base params)
  dora: bool = schema.field(False)

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
  """The adapter: weights[target] = {'a': [L, *in, r], 'b': [L, r, *out]} (+ 'm': [L, *out] with
  DoRA), and its config. Every leaf is trained."""

  weights: dict
  cfg: LoraConfig = flax.struct.field(pytree_node=False)


def io_shapes(target: str, cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Input and output axes of a target projection, in the einsum layout of model.py."""
  proj, size = PROJECTIONS[target], axis_sizes(cfg)
  return tuple(size[a] for a in proj.in_axes), tuple(size[a] for a in proj.out_axes)


def init(key: jax.Array, cfg: ModelConfig, lcfg: LoraConfig, dtype=jnp.float32,
         params: Params | None = None) -> Lora:
  """A as PEFT initialises it (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in))), B zero; with
  DoRA, m = ||W|| per output feature, read from the base `params` (float or int8)."""
  if lcfg.dora and params is None:
    raise ValueError("lora.dora=true: lora.init needs the base params (params=...) to set the "
                     "magnitudes to the base weight norms")
  weights = {}
  for i, target in enumerate(lcfg.targets):
    ins, outs = io_shapes(target, cfg)
    bound = 1.0 / math.sqrt(math.prod(ins))
    a = jax.random.uniform(jax.random.fold_in(key, i), (cfg.num_layers, *ins, lcfg.r), dtype,
                           -bound, bound)
    weights[target] = {"a": a, "b": jnp.zeros((cfg.num_layers, lcfg.r, *outs), dtype)}
  if lcfg.dora:
    for target, m in _base_norms(params["layers"], lcfg.targets).items():
      weights[target]["m"] = m.astype(dtype)
  return Lora(weights, lcfg)


@functools.partial(jax.jit, static_argnames="targets")
def _base_norms(layers: Params, targets: tuple[str, ...]) -> dict:
  """||W|| per output feature of each target, [L, *out_axes]; one compile for all targets, one
  layer at a time (lax.map, not vmap), so only one dense float32 weight exists at once."""
  return {t: jax.lax.map(lambda d, p=PROJECTIONS[t]: _out_norm(dense_weight(d, p), p),
                         layers[PROJECTIONS[t].block][PROJECTIONS[t].param]) for t in targets}


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


def dense_weight(d: dict, proj: Projection) -> jax.Array:
  """One layer's base weight of proj [*weight_axes] as float32, from its dict d ('w', and
  'w_scale' for an int8 or nf4 base): the one place DoRA reads W densely, dequantized as
  ops.einsum does."""
  w, scale = d["w"], d.get("w_scale")
  if proj.part is not None:
    w, scale = w[proj.part], jax.tree.map(lambda s: s[proj.part], scale)
  if isinstance(scale, dict):  # nf4 (quant.py); imported here: quant imports model, model us
    from jax_it import quant  # pylint: disable=g-import-not-at-top
    return quant.dequantize_nf4(w, scale, proj.eq)
  if scale is not None:
    w = w.astype(scale.dtype) * scale
  return w.astype(jnp.float32)


def _out_norm(w: jax.Array, proj: Projection) -> jax.Array:
  """||w|| over the contracted axes: one norm per output feature, [*out_axes]."""
  lead = w.ndim - len(proj.weight_axes)  # a stacked L axis, if any
  axes = tuple(lead + proj.weight_axes.index(c) for c in proj.in_axes)
  return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axes))


def weight_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: float,
                proj: Projection) -> jax.Array:
  """||W + scale * A B|| per output feature, float32 and without gradient: PEFT detaches it
  (DoRA paper, section 4.3), so A and B learn only through the LoRA path."""
  a, b = jax.lax.stop_gradient((a, b))
  ab = jnp.einsum(f"{proj.in_axes}r,r{proj.out_axes}->{proj.weight_axes}", a.astype(jnp.float32),
                  b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jax.lax.stop_gradient(_out_norm(w + scale * ab, proj))


def add_delta(y: jax.Array, x: jax.Array, proj: Projection, layer: LayerAdapter | None,
              matmul: str | None, kernels: str = "auto", base: dict | None = None) -> jax.Array:
  """y + scale * (dropout(x) A) B when `layer` adapts `proj`, in x's dtype.

  With DoRA (a magnitude 'm'), as PEFT: y + (g - 1) * base(x') + g * scale * (x' A) B with
  g = m / ||W + scale A B||, x' = dropout(x) and base(x') = y when nothing is dropped (eval, or
  dropout 0); W is read from `base`, the layer's weight dict of the projection.
  """
  if layer is None or proj.name not in layer.weights:
    return y.astype(x.dtype)
  lw = layer.weights[proj.name]
  a, b = lw["a"], lw["b"]
  dropped = layer.dropout > 0.0 and layer.key is not None
  if dropped:
    salt = list(PROJECTIONS).index(proj.name)
    keep = jax.random.bernoulli(jax.random.fold_in(layer.key, salt), 1.0 - layer.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - layer.dropout), 0).astype(x.dtype)
  eq_a, eq_b = lora_eqs(proj.eq)
  if matmul is None:  # in the adapter's dtype
    xa = ops.einsum(eq_a, x.astype(a.dtype), a, kernels=kernels)
    delta = ops.einsum(eq_b, xa, b, kernels=kernels) * layer.scale
  else:
    xa = ops.einsum(eq_a, x, a, matmul, kernels=kernels)
    delta = ops.einsum(eq_b, xa, b, matmul, kernels=kernels) * layer.scale
  if "m" not in lw and "g" not in lw:
    if matmul is None:
      return y + delta.astype(y.dtype)
    return (y + delta).astype(x.dtype)
  if base is None:
    raise ValueError(f"DoRA on {proj.name}: add_delta needs the layer's base weight (base=)")
  # g broadcasts over y: every projection's output ends with its out_axes, in the weight's order
  if "g" in lw:  # folded once for decoding (fold_norms)
    g = lw["g"].astype(jnp.float32)
  else:
    g = lw["m"].astype(jnp.float32) / weight_norm(dense_weight(base, proj), a, b, layer.scale,
                                                  proj)
  base_y = y
  if dropped:  # PEFT recomputes the base output from the dropped input
    base_y = ops.einsum(proj.eq, x, base["w"], matmul, scale=base.get("w_scale"), part=proj.part,
                        kernels=kernels)
  f32 = jnp.float32
  out = y.astype(f32) + (g - 1.0) * base_y.astype(f32) + g * delta.astype(f32)
  return out.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("proj", "scale"))
def _fold(m, a, b, d, proj: Projection, scale: float):
  """m / ||W + scale A B|| of every layer, one layer at a time (as _base_norms)."""
  norms = jax.lax.map(lambda x: weight_norm(dense_weight(x[0], proj), x[1], x[2], scale, proj),
                      (d, a, b))
  return m.astype(jnp.float32) / norms


def fold_norms(adapter: Lora | None, params: Params) -> Lora | None:
  """The adapter for decoding: DoRA's g = m / ||W + scale A B|| computed once (it depends on the
  weights alone; each decoded token would otherwise recompute every norm), kept as 'g' in place of
  'm'. Plain LoRA is returned as it is."""
  if adapter is None or not any("m" in w for w in adapter.weights.values()):
    return adapter
  weights = {}
  for target, w in adapter.weights.items():
    proj = PROJECTIONS[target]
    if "m" in w:
      d = params["layers"][proj.block][proj.param]
      w = {"a": w["a"], "b": w["b"],
           "g": _fold(w["m"], w["a"], w["b"], d, proj, adapter.cfg.scale)}
    weights[target] = w
  return Lora(weights, adapter.cfg)


# ---------------------------------------------------------------------------------------------
# Merging


def delta(adapter: Lora, target: str) -> jax.Array:
  """scale * A B for every layer, laid out like the base weight: [L, *weight_axes] (with DoRA,
  merge also rescales W + delta by m / ||W + delta||)."""
  proj = PROJECTIONS[target]
  a, b = adapter.weights[target]["a"], adapter.weights[target]["b"]
  d = jnp.einsum(f"L{proj.in_axes}r,Lr{proj.out_axes}->L{proj.weight_axes}",
                 a.astype(jnp.float32), b.astype(jnp.float32))
  return d * adapter.cfg.scale


def merge(params: Params, adapter: Lora) -> Params:
  """Fold the adapter into a copy of the base params (for export); the input is not modified.

  W + scale A B, or with DoRA m / ||W + scale A B|| * (W + scale A B) per output feature (PEFT's
  merge_and_unload)."""
  if "input_embedding_scale" in params["embedder"]:
    raise ValueError("merge needs float base params; load the model with model.quant=none "
                     "(this one is int8 or nf4)")
  layers = jax.tree.map(lambda x: x, params["layers"])
  for target in adapter.cfg.targets:
    proj = PROJECTIONS[target]
    block = layers[proj.block]
    w = block[proj.param]["w"]
    old = w if proj.part is None else w[:, proj.part]
    new = old.astype(jnp.float32) + delta(adapter, target)
    if "m" in adapter.weights[target]:
      g = adapter.weights[target]["m"].astype(jnp.float32) / _out_norm(new, proj)
      new = new * jnp.expand_dims(g, tuple(1 + proj.weight_axes.index(c) for c in proj.in_axes))
    new = new.astype(w.dtype)
    block[proj.param] = {"w": new if proj.part is None else w.at[:, proj.part].set(new)}
  return dict(params, layers=layers)


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories: written and read as peft.PeftModel does

_PEFT_KEY = re.compile(
    r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A\.weight|B\.weight|magnitude_vector)$")
# the key suffix PEFT saves each of our weights under
_PEFT_SUFFIX = {"a": "lora_A.weight", "b": "lora_B.weight", "m": "lora_magnitude_vector"}
_FROM_SUFFIX = {"A.weight": "a", "B.weight": "b", "magnitude_vector": "m"}

# adapter_config.json keys we do not implement, refused when set: each changes what the adapter
# computes (or which weights it touches) in a way these weights alone do not describe
_UNSUPPORTED = ("layers_to_transform", "rank_pattern", "alpha_pattern", "modules_to_save",
                "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters",
                "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config",
                "kasa_config", "monteclora_config")


def _peft_name(target: str, layer: int, which: str) -> str:
  """PEFT's key of weight `which` ('a', 'b', 'm') of target in one layer."""
  return f"base_model.model.model.layers.{layer}.{PROJECTIONS[target].hf}.{_PEFT_SUFFIX[which]}"


def _peft_shape(which: str, ins, outs, r: int) -> tuple[int, ...]:
  """PEFT's shape of a weight: A [r, in], B [out, r], magnitude [out], (head, dim) flattened."""
  return {"a": (r, math.prod(ins)), "b": (math.prod(outs), r), "m": (math.prod(outs),)}[which]


def _from_peft(which: str, t: np.ndarray, ins, outs, r: int) -> np.ndarray:
  """A PEFT tensor in our layout: A [*in, r], B [r, *out], magnitude [*out]."""
  if which == "a":
    return t.T.reshape(*ins, r)
  if which == "b":
    return t.T.reshape(r, *outs)
  return t.reshape(outs)


def save_peft(adapter: Lora, cfg: ModelConfig, out_dir: str, base_model: str | None = None):
  """Write adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel."""
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  lc = adapter.cfg
  tensors = {}
  for target in lc.targets:
    ins, outs = io_shapes(target, cfg)
    w = {k: np.asarray(v, np.float32) for k, v in adapter.weights[target].items()}
    for layer in range(cfg.num_layers):
      # PEFT: lora_A.weight [r, in], lora_B.weight [out, r], with flattened (head, dim) axes
      tensors[_peft_name(target, layer, "a")] = np.ascontiguousarray(
          w["a"][layer].reshape(math.prod(ins), lc.r).T)
      tensors[_peft_name(target, layer, "b")] = np.ascontiguousarray(
          w["b"][layer].reshape(lc.r, math.prod(outs)).T)
      if lc.dora:  # lora_magnitude_vector [out]
        tensors[_peft_name(target, layer, "m")] = np.ascontiguousarray(
            w["m"][layer].reshape(math.prod(outs)))
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": lc.r, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
      "target_modules": list(lc.targets), "use_rslora": lc.rslora, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "modules_to_save": None, "layers_to_transform": None, "use_dora": lc.dora,
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
  for key in _UNSUPPORTED:
    if pc.get(key):
      raise ValueError(f"{path}: {key}={pc[key]!r} is not supported")
  if pc.get("bias", "none") != "none":
    raise ValueError(f"{path}: bias={pc['bias']!r} is not supported; expected 'none'")
  targets = pc["target_modules"]
  if isinstance(targets, str) and targets != "all-linear":
    raise ValueError(f"{path}: target_modules regex {targets!r} is not supported; give a list")
  dora = bool(pc.get("use_dora", False))
  other = [t for t in targets if t not in ALL_LINEAR] if isinstance(targets, list) else []
  if other:  # e.g. embed_tokens: (DoRA) LoRA on an embedding, which we do not implement
    raise ValueError(f"{path}: target_modules {other} {'with use_dora ' if dora else ''}are not "
                     f"supported; expected names from {', '.join(ALL_LINEAR)}")
  return LoraConfig(r=int(pc["r"]), alpha=float(pc["lora_alpha"]),
                    dropout=float(pc.get("lora_dropout", 0.0)),
                    targets=tuple(targets) if isinstance(targets, list) else targets,
                    rslora=bool(pc.get("use_rslora", False)), dora=dora)


def load_peft(adapter_dir: str, cfg: ModelConfig, dtype=jnp.float32) -> Lora:
  """Read a PEFT LoRA (or DoRA) adapter directory into the LoRA pytree."""
  from safetensors import safe_open

  lc = _read_peft_config(adapter_dir)
  path = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.exists(path):
    raise ValueError(f"{adapter_dir}: adapter_model.safetensors is missing")
  kinds = ("a", "b", "m") if lc.dora else ("a", "b")
  arrays = {t: {k: [None] * cfg.num_layers for k in kinds} for t in lc.targets}
  with safe_open(path, framework="np") as f:
    for key in f.keys():
      m = _PEFT_KEY.search(key)
      which = _FROM_SUFFIX[m.group(4)] if m else None
      if not m or m.group(3) not in arrays or which not in kinds:
        raise ValueError(f"{path}: unexpected tensor {key!r} for targets {list(lc.targets)}"
                         f"{'' if lc.dora else ' without use_dora'}")
      layer, target = int(m.group(1)), m.group(3)
      if layer >= cfg.num_layers:
        raise ValueError(f"{path}: tensor {key!r} is for layer {layer}; the model has "
                         f"{cfg.num_layers}")
      ins, outs = io_shapes(target, cfg)
      t = f.get_tensor(key).astype(np.float32)
      want = _peft_shape(which, ins, outs, lc.r)
      if t.shape != want:
        raise ValueError(f"{path}: {key} has shape {t.shape}, expected {want}")
      arrays[target][which][layer] = _from_peft(which, t, ins, outs, lc.r)
  weights = {}
  for target, ab in arrays.items():
    missing = [i for k in kinds for i, x in enumerate(ab[k]) if x is None]
    if missing:
      raise ValueError(f"{path}: {target} is missing tensors for some layers")
    weights[target] = {k: jnp.asarray(np.stack(v), dtype) for k, v in ab.items()}
  return Lora(weights, lc)
