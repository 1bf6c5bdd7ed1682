"""Weight-only quantized base params, dequantized inside each layer (ops.einsum's `scale=`).

int8: per-output-channel absmax scales; each matmul weight becomes {"w": int8, "w_scale": scale}.

nf4 (QLoRA, Dettmers et al. 2023), as bitsandbytes' quantize_4bit(quant_type="nf4") (bit for
bit without double quantization; tests/test_quant.py): each run of `block` consecutive weights
along the contracted axes (the `in` of the [out, in] matrix transformers stores) is divided by
its absmax and rounded to the nearest of 16 normal quantiles. One stacked weight
[L, (part,) *weight_axes] becomes
  "w":       uint8 [L, (part,) *weight_axes, last contracted axis halved]: two codes per byte,
             the even element in the high nibble (bitsandbytes' packing)
  "w_scale": {"absmax": float32 [L, (part,) *out axes before, C / block, *out axes after]}
             (C: the contracted size), or with double quantization (bitsandbytes'
             compress_statistics=True) the absmax of each [out, in] matrix, in that matrix's
             order, less its mean, in 8-bit dynamic codes with one float32 scale per 256:
             {"absmax": uint8 [L, (part,) n], "absmax_scale": float32 [L, (part,) ceil(n / 256)],
              "absmax_offset": float32 [L, (part,)]}, n = out size * C / block
Every leaf keeps the leading layer axis, so ops.take_layer indexes them like any weight. The
embedding stays int8 rows in both: it is also the tied output projection, whose error reaches
every logit (bitsandbytes leaves embeddings and lm_head unquantized), and model.embed and
model.logits_from_hidden already read int8 rows.

Written here, not with qwix (Google's JAX quantization library; 0.1.8 has an nf4 qtype): in
benchmarks/nf4.py on a 2-core CPU its decoding made the 270M LoRA step 3.8x slower (8.2 s
against 2.2 s), its jnp.uint4 codes take a byte each on XLA:CPU (1.06 bytes per weight against
0.52), it quantizes 2.7x slower and has no double quantization; fed float32, its values do equal
bitsandbytes'.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_it.families import PROJECTIONS, Params, Projection
from jax_it.schema import ConfigError


def input_axes(p: Projection) -> tuple[int, ...]:
  """Axes that projection p contracts in its stacked weight [L, (part,) *p.weight_axes]."""
  lead = 1 if p.part is None else 2
  return tuple(lead + p.weight_axes.index(a) for a in p.in_axes)


# input (contracted) axes of each stacked matmul weight; scales keep every other axis. The halves
# of a stacked weight (k/v, gate/up) share one entry.
_INPUT_AXES = {(p.block, p.param): input_axes(p) for p in PROJECTIONS.values()}
# one projection per stacked weight, in PROJECTIONS' order (the halves have the same axes)
_WEIGHTS: dict[tuple[str, str], Projection] = {}
for _p in PROJECTIONS.values():
  _WEIGHTS.setdefault((_p.block, _p.param), _p)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(w: jax.Array, axes: tuple[int, ...], dtype) -> tuple[jax.Array, jax.Array]:
  absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=True)
  scale = jnp.maximum(absmax, 1e-12) / 127.0
  q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
  return q, scale.astype(dtype)


def _quantized(params: Params, dtype, weight, rows=None, consume: bool = False) -> Params:
  """params with each stacked matmul weight replaced by weight(block, name, w), the embedding
  as int8 rows (`rows` of them at a time; None: at once) and the norms in `dtype`. Leaves are
  converted one at a time; with `consume` each float one is deleted once converted."""
  def done(x):
    if consume and not isinstance(x, jax.core.Tracer):
      x.delete()

  layers = dict(params["layers"])
  for block, name in _WEIGHTS:
    w = layers[block][name]["w"]
    layers[block] = dict(layers[block], **{name: weight(block, name, w)})
    done(w)
  for key, value in layers.items():
    if key not in ("attn", "mlp"):
      layers[key] = jax.tree.map(lambda x: x.astype(dtype), value)
  for key in ("_query_norm", "_key_norm"):
    if key in layers["attn"]:
      layers["attn"][key] = jax.tree.map(lambda x: x.astype(dtype), layers["attn"][key])
  table = params["embedder"]["input_embedding"]
  if rows is None:
    emb, emb_scale = _quantize(table, (1,), dtype)
  else:
    emb, emb_scale = _int8_rows(table, dtype, rows)
  done(table)
  return {"embedder": {"input_embedding": emb, "input_embedding_scale": emb_scale},
          "layers": layers,
          "final_norm": {"scale": params["final_norm"]["scale"].astype(dtype)}}


@functools.partial(jax.jit, donate_argnums=0)
def _put(out: jax.Array, x: jax.Array, start) -> jax.Array:
  """out with x written at `start` along axis 0, in place (out is donated)."""
  return jax.lax.dynamic_update_slice_in_dim(out, x.astype(out.dtype), start, 0)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _int8_chunk(table, start, rows: int, dtype):
  return _quantize(jax.lax.dynamic_slice_in_dim(table, start, rows), (1,), dtype)


def _int8_rows(table: jax.Array, dtype, rows: int) -> tuple[jax.Array, jax.Array]:
  """_quantize(table, (1,), dtype), `rows` rows at a time into preallocated outputs: one float32
  block at a time instead of a float32 table (the last block overlaps its neighbour)."""
  rows = min(rows, table.shape[0])
  q = jnp.zeros(table.shape, jnp.int8)
  scale = jnp.zeros((table.shape[0], 1), dtype)
  for start in range(0, table.shape[0], rows):
    start = min(start, table.shape[0] - rows)
    q_rows, scale_rows = _int8_chunk(table, start, rows, dtype)
    q, scale = _put(q, q_rows, start), _put(scale, scale_rows, start)
  return q, scale


def quantize_int8(params: Params, dtype=jnp.bfloat16) -> Params:
  """Symmetric int8 matmul weights and embedding rows; norms stay in `dtype`.

  Activations then run in `dtype` (the scales' dtype). Leaves are converted one at a time,
  so the peak is the input params plus one float32 leaf.
  """
  def weight(block, name, w):
    q, scale = _quantize(w, _INPUT_AXES[(block, name)], dtype)
    return {"w": q, "w_scale": scale}
  return _quantized(params, dtype, weight)


def nbytes(params: Params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# NF4

# bitsandbytes' get_4bit_type("nf4") (QLoRA appendix E): quantiles of N(0, 1) scaled to [-1, 1]
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# bitsandbytes rounds by bucketizing at the float32 midpoints (ties to the lower code)
_NF4_BOUNDS = (NF4[:-1] + NF4[1:]) / np.float32(2)
NF4_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' block sizes
NF4_BLOCK = 64  # bitsandbytes' default
NESTED_BLOCK = 256  # absmax values per float32 scale with double quantization (bitsandbytes')
EMBEDDING_ROWS = 16384  # rows of the table quantize_nf4 converts to int8 at a time


def dynamic_code() -> np.ndarray:
  """The 256 sorted values of bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()),
  which double quantization rounds the absmax to; float32 steps as torch.linspace takes them."""
  values = [0.0, 1.0]
  for i in range(7):  # 7 exponents, 2**i fractions each, both signs
    n = 2 ** i + 1
    step = (np.float32(1.0) - np.float32(0.1)) / np.float32(n - 1)
    k = np.arange(n, dtype=np.float64)
    lin = np.where(k < n // 2, np.float64(np.float32(0.1)) + np.float64(step) * k,
                   1.0 - np.float64(step) * (n - 1 - k)).astype(np.float32)
    means = (lin[:-1] + lin[1:]) / np.float32(2)
    values += list(np.float32(10.0 ** (i - 6)) * means) + list(np.float32(-10.0 ** (i - 6)) * means)
  return np.sort(np.asarray(values, np.float32))


_DYNAMIC = dynamic_code()


def _contracted(weight_axes: str, in_axes: str) -> tuple[int, int]:
  """(first, last + 1) of the contracted axes in weight_axes: one run in every projection."""
  idx = sorted(weight_axes.index(a) for a in in_axes)
  if idx != list(range(idx[0], idx[-1] + 1)):
    raise ValueError(f"nf4 needs contiguous contracted axes; {in_axes} of {weight_axes} are not")
  return idx[0], idx[-1] + 1


def _eq_axes(eq: str) -> tuple[str, str]:
  """(weight letters, contracted letters) of a projection einsum 'x,w->y'."""
  ins, out = eq.split("->")
  w = ins.split(",")[1]
  return w, "".join(a for a in w if a not in out)


def _nf4_tensor(w, weight_axes: str, in_axes: str, block: int, nested: bool):
  """One weight [*weight_axes] -> (packed codes, scale dict) as described in the module doc."""
  lo, hi = _contracted(weight_axes, in_axes)
  shape = w.shape
  pre, post, C = shape[:lo], shape[hi:], math.prod(shape[lo:hi])
  x = w.astype(jnp.float32).reshape(pre + (C // block, block) + post)
  absmax = jnp.max(jnp.abs(x), axis=lo + 1)
  inv = jnp.expand_dims(1.0 / jnp.maximum(absmax, np.float32(1e-38)), lo + 1)
  scaled = jnp.clip(x * inv, -1.0, 1.0)
  codes = sum((scaled > b).astype(jnp.uint8) for b in _NF4_BOUNDS)  # torch.bucketize's index
  pairs = codes.reshape(shape[:hi - 1] + (shape[hi - 1] // 2, 2) + post)
  packed = (jnp.take(pairs, 0, axis=hi) << 4) | jnp.take(pairs, 1, axis=hi)
  if not nested:
    return packed, {"absmax": absmax}
  flat = jnp.moveaxis(absmax, lo, -1).reshape(-1)  # the [out, in / block] matrix's order
  offset = jnp.mean(flat)
  q, scale = _dynamic_quantize(flat - offset)
  return packed, {"absmax": q, "absmax_scale": scale, "absmax_offset": offset}


def _dynamic_quantize(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a [n] -> (uint8 codes [n], float32 absmax per 256) as bitsandbytes' quantize_blockwise:
  the nearest code of a / absmax, ties to the lower one (its CUDA kernel's rounding; its CPU
  search takes the farther neighbour of about 0.2% of values, those near a midpoint)."""
  n = a.shape[0]
  blocks = jnp.pad(a, (0, -n % NESTED_BLOCK)).reshape(-1, NESTED_BLOCK)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  code = jnp.asarray(_DYNAMIC)
  i = jnp.clip(jnp.searchsorted(code, normed, side="right") - 1, 0, len(_DYNAMIC) - 2)
  up = jnp.abs(normed - code[i + 1]) < jnp.abs(normed - code[i])
  return (i + up).astype(jnp.uint8).reshape(-1)[:n], absmax


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _nf4_layer(w, weight_axes: str, in_axes: str, parts: bool, block: int, nested: bool):
  one = functools.partial(_nf4_tensor, weight_axes=weight_axes, in_axes=in_axes, block=block,
                          nested=nested)
  return (jax.vmap(one) if parts else one)(w)


def _quantize_nf4(w, weight_axes: str, in_axes: str, parts: bool, block: int, nested: bool):
  """A stacked weight [L, (part,) ...], one layer at a time into preallocated outputs: the
  temporaries are one layer's (in one jitted loop, XLA:CPU copied the whole stack, as float32
  when it was bfloat16)."""
  out = None
  for i in range(w.shape[0]):
    layer = _nf4_layer(w[i], weight_axes, in_axes, parts, block, nested)
    if out is None:
      out = jax.tree.map(lambda x: jnp.zeros((w.shape[0], *x.shape), x.dtype), layer)
    out = jax.tree.map(lambda o, x, i=i: _put(o, x[None], i), out, layer)
  return out


def check_nf4(params: Params, block: int = NF4_BLOCK) -> None:
  """A one-line ConfigError naming the first stacked weight nf4 blocks of `block` cannot cover."""
  if block not in NF4_BLOCKS:
    raise ConfigError(f"model.nf4_block={block}: expected one of {NF4_BLOCKS}")
  for (b, name), p in _WEIGHTS.items():
    shape = params["layers"][b][name]["w"].shape[-len(p.weight_axes):]
    lo, hi = _contracted(p.weight_axes, p.in_axes)
    C = math.prod(shape[lo:hi])
    what = f"model.quant=nf4: layers/{b}/{name} contracts {'*'.join(p.in_axes)} = {C} values"
    if C % block:
      raise ConfigError(f"{what}, which model.nf4_block={block} does not divide; supported: "
                        f"contracted sizes that are multiples of the block (a smaller "
                        f"model.nf4_block dividing {C}, or model.quant=int8)")
    if shape[hi - 1] % 2:
      raise ConfigError(f"{what} whose last axis {p.in_axes[-1]}={shape[hi - 1]} is odd; "
                        "supported: an even last contracted axis (two codes per byte), or "
                        "model.quant=int8")


def quantize_nf4(params: Params, dtype=jnp.bfloat16, block: int = NF4_BLOCK,
                 double_quant: bool = True, consume: bool = False) -> Params:
  """NF4 matmul weights (module doc), int8 embedding rows, norms in `dtype`.

  Activations run in `dtype` (the embedding scales'); each layer's weights are decoded in
  float32 and rounded to the matmul's dtype, as bitsandbytes' dequantize_4bit does. Weights are
  converted one at a time, each one layer (the embedding EMBEDDING_ROWS rows) at a time: the
  peak is the input params, the outputs so far and one layer's float32 temporaries. With
  `consume` (the caller's float params are not used again) each float weight is deleted once
  converted, so the peak is about the input params alone.
  """
  check_nf4(params, block)

  def weight(b, name, w):
    p = _WEIGHTS[(b, name)]
    q, scale = _quantize_nf4(w, p.weight_axes, p.in_axes, p.part is not None, block,
                             double_quant)
    return {"w": q, "w_scale": scale}
  return _quantized(params, dtype, weight, EMBEDDING_ROWS, consume)


def dequantize_nf4(w: jax.Array, scale: dict, eq: str) -> jax.Array:
  """The float32 weight of `eq` ('x,w->y', a projection's) from its NF4 codes and scales, with
  any leading axes (layers, part) that w and the scales share."""
  weight_axes, in_axes = _eq_axes(eq)
  lead = w.ndim - len(weight_axes)
  lo, hi = (lead + i for i in _contracted(weight_axes, in_axes))
  shape = w.shape[:hi - 1] + (2 * w.shape[hi - 1],) + w.shape[hi:]
  codes = jnp.stack([w >> 4, w & 15], axis=hi).reshape(shape)
  values = jnp.asarray(NF4)[codes]
  absmax = _absmax(scale, shape, lead, lo, hi)
  nb, C = absmax.shape[lo], math.prod(shape[lo:hi])
  values = values.reshape(shape[:lo] + (nb, C // nb) + shape[hi:])
  return (values * jnp.expand_dims(absmax, lo + 1)).reshape(shape)


def _absmax(scale: dict, shape: tuple, lead: int, lo: int, hi: int) -> jax.Array:
  """The float32 absmax [*lead, *pre, C / block, *post] of an NF4 weight's scale dict."""
  if "absmax_scale" not in scale:
    return scale["absmax"]
  q, s, offset = scale["absmax"], scale["absmax_scale"], scale["absmax_offset"]
  n, outer = q.shape[-1], shape[:lead]
  v = jnp.asarray(_DYNAMIC)[q]
  v = jnp.pad(v, [(0, 0)] * lead + [(0, -n % NESTED_BLOCK)])
  v = (v.reshape(outer + s.shape[-1:] + (NESTED_BLOCK,)) * s[..., None]).reshape(outer + (-1,))
  v = v[..., :n] + offset[..., None]
  out = shape[lead:lo] + shape[hi:]
  return jnp.moveaxis(v.reshape(outer + out + (n // math.prod(out),)), -1, lo)
