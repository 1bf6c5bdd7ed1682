"""The cross-entropy of the train step: next-token NLL at loss positions, vocabulary-blocked.

No [rows, V] logits array ever exists: rows are taken in chunks, the vocabulary in blocks with a
running max and sum, and the gradient w.r.t. the hidden states is formed in the same pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_it import model, ops
from jax_it.model import ModelConfig, Params

VOCAB_BLOCK = 2048  # vocabulary rows per step of the loss: a [rows, 2048] block stays in cache


def _nll_and_dh(params, h, targets, weights, cfg, vocab_block):
  """Weighted NLL sum of a chunk and its gradient w.r.t. h, in one pass over the vocabulary.

  With z = h T^T (times the per-row scales of an int8 table) and logits = softcap(z), the
  gradient is dh = sum_v w (p_v - [v = t]) J_v T_v, where J_v = d logit_v / d (h . T_v) holds
  the row's int8 scale and the soft-cap derivative. The vocabulary is walked in blocks of
  `vocab_block` rows (None: all of it at once) with a running max m and sum s (rescaled when m
  grows), accumulating A = sum_{v != t} exp(logit_v - m) J_v T_v, so no [rows, V] array exists
  and both matmuls run on cache-sized blocks. The target's term (exp(logit_t - m) - s) J_t T_t
  is added in float32 at the end: a confident target's small p_t - 1 keeps its relative
  precision when the blocks' matmuls run in bfloat16. dh = (A + that term) w / s.

  The table comes as ops.carry gives it (on XLA:CPU, bfloat16 as uint16 bits).
  """
  emb = params["embedder"]
  bits, scale = emb["input_embedding"], emb.get("input_embedding_scale")
  cap = cfg.final_logit_soft_cap
  mm = h.dtype if cfg.matmul_dtype is None else jnp.dtype(cfg.matmul_dtype)  # matmul inputs
  bits, hm = ops.tie(bits, h.astype(mm), cfg.kernels)
  R, D = h.shape
  V = bits.shape[0]
  f32 = jnp.float32

  def block(carry, start, size):
    m, s, acc, logit_t = carry
    t_b = ops.rows(bits, start, size).astype(mm)
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
  t_t = ops.gather(bits, targets).astype(f32)
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
  params = {"embedder": dict(emb, input_embedding=ops.carry(table, cfg.kernels))}

  def body(total, xs):
    return total + _chunk_nll(params, *xs, cfg, vocab_block), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (h.reshape(n, chunk, D), targets.reshape(n, chunk),
                           weights.reshape(n, chunk)))
  return total
