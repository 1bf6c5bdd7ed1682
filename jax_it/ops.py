"""Backend-specific ways of computing the model's math, behind one plain interface.

`model.py`, `lora.py` and `loss.py` call these functions instead of jnp directly where XLA's CPU
backend needs help; each takes the resolved `kernels` name of the model config:

  "plain": what accelerators run: jnp.einsum with the matmul inputs rounded to the matmul dtype
           and float32 accumulation, JAX's own autodiff, layers and tables indexed as they are.
  "cpu":   three workarounds for XLA:CPU, each measured in benchmarks/RESULTS.md:
           - a hand-written matmul VJP that rounds the incoming gradient to the matmul dtype (the
             bf16 units are 3-5x faster than float32 here) and keeps the weight itself, not a
             slice or dequantized copy, as its residual (scan would store one per layer);
           - bfloat16 weights and the embedding table carried as uint16 bit patterns: XLA:CPU
             turns any slice of a bfloat16 array into float32 and hoists a float32 copy of the
             whole stacked array out of the loop;
           - an optimization barrier tying the loss's table to the rows it multiplies, so JAX's
             scan partial evaluation does not hoist every vocabulary block's slice at once.
  "auto":  "cpu" on the CPU backend, "plain" elsewhere.

tests/test_ops.py runs a loss and its LoRA gradients through both and finds them equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_it import quant

KERNELS = ("auto", "plain", "cpu")


def resolve(kernels: str) -> str:
  """"plain" or "cpu" for a config's `kernels` setting (read at trace time)."""
  if kernels not in KERNELS:
    raise ValueError(f"model.kernels={kernels!r}: expected one of {', '.join(KERNELS)}")
  if kernels == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "plain"
  return kernels


# ---------------------------------------------------------------------------------------------
# Matmuls


def einsum(eq: str, x: jax.Array, w: jax.Array, dtype: str | None = None, *,
           scale: jax.Array | dict | None = None, part: int | None = None,
           kernels: str = "auto") -> jax.Array:
  """`jnp.einsum(eq, x, w)`; w may be quantized (quant.py), dequantized here by `scale`: int8's
  scale array, or NF4's dict of scales (decoded in float32, rounded to the matmul's dtype).

  With `dtype` (e.g. "bfloat16") both inputs are rounded to it and the result is float32 (fast
  bf16 units, float32 accumulation). `part` uses `w[part]`, one half of a stacked gate/up or
  key/value weight.
  """
  dtype = None if dtype is None else jnp.dtype(dtype).name
  if resolve(kernels) == "cpu":
    return _einsum(eq, dtype, part, x, w, scale)
  wp = _weight_part(eq, w, scale, part, dtype or x.dtype)
  if dtype is None:
    return jnp.einsum(eq, x, wp)
  return jnp.einsum(eq, x.astype(dtype), wp.astype(dtype), preferred_element_type=jnp.float32)


def _weight_part(eq, w, scale, part, dtype):
  """w (or w[part]) as the matmul reads it: int8 times its scale; NF4 (a dict of scales) in
  `dtype`, the matmul's."""
  if part is not None:
    w, scale = w[part], jax.tree.map(lambda s: s[part], scale)
  if isinstance(scale, dict):
    return quant.dequantize_nf4(w, scale, eq).astype(dtype)
  return w if scale is None else w.astype(scale.dtype) * scale


def _einsum_fwd(eq, dtype, part, x, w, scale):
  wp = _weight_part(eq, w, scale, part, dtype or x.dtype)
  if dtype is None:
    return jnp.einsum(eq, x, wp), (x, w, scale, jnp.zeros((0,), x.dtype))
  xl = x.astype(dtype)
  out = jnp.einsum(eq, xl, wp.astype(dtype), preferred_element_type=jnp.float32)
  return out, (xl, w, scale, jnp.zeros((0,), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _einsum(eq, dtype, part, x, w, scale):
  return _einsum_fwd(eq, dtype, part, x, w, scale)[0]


def _einsum_bwd(eq, dtype, part, res, g):
  x, w, scale, x_like = res
  wp = _weight_part(eq, w, scale, part, dtype or x_like.dtype)
  ins, out = eq.split("->")
  a, b = ins.split(",")
  if dtype is None:
    dx = jnp.einsum(f"{out},{b}->{a}", g, wp)
    dwp = jnp.einsum(f"{a},{out}->{b}", x, g)
  else:
    g, wp = g.astype(dtype), wp.astype(dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", g, wp, preferred_element_type=jnp.float32)
    dwp = jnp.einsum(f"{a},{out}->{b}", x, g, preferred_element_type=jnp.float32)
  # The gradient of a frozen base weight is never used and XLA drops it; it is formed so that
  # the rule is a complete VJP (LoRA weights and the attention core use it).
  if scale is not None:  # a quantized weight: no gradient
    return dx.astype(x_like.dtype), None, None
  dw = dwp.astype(w.dtype)
  if part is not None:
    dw = jnp.zeros_like(w).at[part].set(dw)
  return dx.astype(x_like.dtype), dw, None


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


# ---------------------------------------------------------------------------------------------
# Stacked layer weights and the embedding table


def _to_bits(w):
  return jax.lax.bitcast_convert_type(w, jnp.uint16) if w.dtype == jnp.bfloat16 else w


def from_bits(w):
  """A weight as stored by `carry` back in its own dtype (a no-op for other arrays)."""
  return jax.lax.bitcast_convert_type(w, jnp.bfloat16) if w.dtype == jnp.uint16 else w


def carry(tree, kernels: str = "auto"):
  """Weights as a loop carries them: bfloat16 as uint16 bits on "cpu", unchanged on "plain"."""
  return jax.tree.map(_to_bits, tree) if resolve(kernels) == "cpu" else tree


def take_layer(tree, i: jax.Array):
  """Layer i of stacked weights carried by `carry`, in their own dtypes."""
  return jax.tree.map(lambda w: from_bits(jax.lax.dynamic_index_in_dim(w, i, keepdims=False)),
                      tree)


def rows(table: jax.Array, start, size: int) -> jax.Array:
  """Rows start:start+size of a table carried by `carry`."""
  return from_bits(jax.lax.dynamic_slice_in_dim(table, start, size))


def gather(table: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows idx of a table carried by `carry`."""
  return from_bits(table[idx])


def tie(table: jax.Array, x: jax.Array, kernels: str = "auto"):
  """(table, x), made inseparable on "cpu": a table tied to the rows it multiplies is no loop
  invariant of the enclosing scans, so its block slices are not hoisted out as one copy."""
  if resolve(kernels) == "cpu":
    return jax.lax.optimization_barrier((table, x))
  return table, x


# ---------------------------------------------------------------------------------------------
# Attention kernels
#
# "xla":    scores [B, K, G, T, S] formed, soft-capped, masked by an additive bias, softmax, then
#           the values (model._attention); runs everywhere, and is the only path with a KV cache.
# "cudnn":  GPU: jax.nn.dot_product_attention's cuDNN flash attention: causal, sliding window,
#           packed segments as a boolean [B, 1, T, S] mask shared by all heads (cuDNN turns it
#           into a bias; the [B, N, T, S] scores never exist). cuDNN has no logit soft-cap and
#           computes in 16-bit floats only.
# "splash": TPU: Pallas splash attention: causal or local masks, segment ids and soft-cap inside
#           the kernel; rows must tile into blocks of 128.
# "auto":   cudnn on GPU, splash on TPU, xla elsewhere; where the layer or the dtype rules the
#           kernel out it runs xla and says so once on stderr.
# The fused kernels index keys by position in the row, as packing lays rows out (positions count
# up by one inside each segment); they run without a KV cache (training, loss, scoring).

ATTENTION = ("auto", "xla", "cudnn", "splash")
_BACKEND_ATTENTION = {"gpu": "cudnn", "tpu": "splash"}
SPLASH_BLOCK = 128
# Tests run the kernels' code on CPU: splash in Pallas interpret mode, the cuDNN call's arguments
# through jax.nn.dot_product_attention's XLA implementation.
PALLAS_INTERPRET = False
CUDNN_IMPLEMENTATION = "cudnn"
_said: set = set()


def _say_once(message: str):
  if message not in _said:
    _said.add(message)
    import sys  # pylint: disable=g-import-not-at-top
    print(f"attention: {message}", file=sys.stderr)


def attention_impl(name: str, *, soft_cap: float | None, dtype, cached: bool,
                   length: int) -> str:
  """The attention kernel a layer runs: "xla", "cudnn" or "splash" (see above).

  An explicit kernel the backend lacks, or one the model rules out, is an error naming the key;
  "auto" falls back to xla with a line on stderr.
  """
  backend = jax.default_backend()
  native = _BACKEND_ATTENTION.get(backend)
  if name not in ATTENTION:
    raise ValueError(f"model.attention={name!r}: expected one of {', '.join(ATTENTION)}")
  if name not in ("auto", "xla") and name != native:
    have = ", ".join(a for a in ("auto", "xla", native) if a)
    raise ValueError(f"model.attention={name!r}: the {backend} backend has no {name} kernel; "
                     f"supported there: {have}")
  want = native if name == "auto" else name
  if want in (None, "xla") or cached:
    return "xla"
  why = None
  if want == "cudnn" and soft_cap is not None:
    why = f"cuDNN has no logit soft-cap (this model caps at {soft_cap:g})"
  elif want == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    why = f"cuDNN computes in bfloat16/float16, this model's attention in {jnp.dtype(dtype).name}"
  elif want == "splash" and length % SPLASH_BLOCK:
    why = (f"splash tiles rows in blocks of {SPLASH_BLOCK}, these have {length} tokens "
           f"(set data.max_len to a multiple of {SPLASH_BLOCK})")
  if why is None:
    return want
  if name != "auto":
    raise ValueError(f"model.attention={name!r} on {backend}: {why}; use auto or xla")
  _say_once(f"xla instead of {want}: {why}")
  return "xla"


def fused_attention(impl: str, q, k, v, segment_ids, is_local, window: int | None,
                    soft_cap: float | None) -> jax.Array:
  """Causal attention of q [B, T, N, H] (already scaled) over k, v [B, T, K, H] by a fused
  kernel; segment_ids [B, T]; is_local (traced) picks the `window` mask. Returns [B, T, N, H]
  in v's dtype."""
  kernel = {"cudnn": _cudnn, "splash": _splash}[impl]
  if window is None:
    return kernel(q, k, v, segment_ids, None, soft_cap)
  return jax.lax.cond(is_local,
                      lambda *a: kernel(*a, window, soft_cap),
                      lambda *a: kernel(*a, None, soft_cap),
                      q, k, v, segment_ids)


def _cudnn(q, k, v, seg, window, soft_cap):
  if soft_cap is not None:  # attention_impl rules this out; a direct call must not drop it
    raise ValueError("cuDNN attention has no logit soft-cap")
  mask = (seg[:, :, None] == seg[:, None, :])[:, None]  # [B, 1, T, S]: the segments
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=1.0, is_causal=True, implementation=CUDNN_IMPLEMENTATION,
      local_window_size=None if window is None else (window - 1, 0)).astype(v.dtype)


def _splash(q, k, v, seg, window, soft_cap):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  sk, sm = splash.splash_attention_kernel, splash.splash_attention_mask
  B, T, N, H = q.shape
  K = k.shape[2]
  G = N // K
  one = sm.CausalMask((T, T)) if window is None else sm.LocalMask((T, T), (window - 1, 0), 0)
  block = max(b for b in (512, 256, SPLASH_BLOCK) if T % b == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * G), block_sizes=sizes,
                                            attn_logits_soft_cap=soft_cap,
                                            interpret=PALLAS_INTERPRET)
  # one multi-query kernel per kv head: q [G, T, H] against k, v [T, H]
  qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  kg, vg = (a.transpose(0, 2, 1, 3) for a in (k, v))  # [B, K, T, H]
  per_head = jax.vmap(lambda qh, kh, vh, s: kernel(qh, kh, vh, segment_ids=s),
                      in_axes=(0, 0, 0, None))
  out = jax.vmap(lambda qb, kb, vb, sb: per_head(qb, kb, vb, sk.SegmentIds(q=sb, kv=sb)))(
      qg, kg, vg, seg)  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(v.dtype)
