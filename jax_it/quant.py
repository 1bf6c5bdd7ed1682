"""int8 weight-only base params: per-output-channel scales, dequantized inside each layer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_it.families import PROJECTIONS, Projection
from jax_it.model import Params


def input_axes(p: Projection) -> tuple[int, ...]:
  """Axes that projection p contracts in its stacked weight [L, (part,) *p.weight_axes]."""
  lead = 1 if p.part is None else 2
  return tuple(lead + p.weight_axes.index(a) for a in p.in_axes)


# input (contracted) axes of each stacked matmul weight; scales keep every other axis. The halves
# of a stacked weight (k/v, gate/up) share one entry.
_INPUT_AXES = {(p.block, p.param): input_axes(p) for p in PROJECTIONS.values()}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(w: jax.Array, axes: tuple[int, ...], dtype) -> tuple[jax.Array, jax.Array]:
  absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=True)
  scale = jnp.maximum(absmax, 1e-12) / 127.0
  q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
  return q, scale.astype(dtype)


def quantize_int8(params: Params, dtype=jnp.bfloat16) -> Params:
  """Symmetric int8 matmul weights and embedding rows; norms stay in `dtype`.

  Activations then run in `dtype` (the scales' dtype). Leaves are converted one at a time,
  so the peak is the input params plus one float32 leaf.
  """
  layers = dict(params["layers"])
  for (block, name), axes in _INPUT_AXES.items():
    q, scale = _quantize(layers[block][name]["w"], axes, dtype)
    layers[block] = dict(layers[block], **{name: {"w": q, "w_scale": scale}})
  for key, value in layers.items():
    if key not in ("attn", "mlp"):
      layers[key] = jax.tree.map(lambda x: x.astype(dtype), value)
  for key in ("_query_norm", "_key_norm"):
    if key in layers["attn"]:
      layers["attn"][key] = jax.tree.map(lambda x: x.astype(dtype), layers["attn"][key])
  emb, emb_scale = _quantize(params["embedder"]["input_embedding"], (1,), dtype)
  return {"embedder": {"input_embedding": emb, "input_embedding_scale": emb_scale},
          "layers": layers,
          "final_norm": {"scale": params["final_norm"]["scale"].astype(dtype)}}


def nbytes(params: Params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
