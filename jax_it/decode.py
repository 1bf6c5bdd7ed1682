"""Decoding primitives under every generation path: choosing the next token (greedy, temperature,
top-k, top-p), prompts padded into few shapes, the prefill, a batch decoded in one compiled loop,
and a single decode step for streaming. `sample` builds the public calls on them, `decode_queue`
the queue of prompts through refilled slots."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_it import model
from jax_it.model import ModelConfig

# Prompts are right-padded to a multiple of this, so few prefill shapes are ever compiled.
PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  """The part of a SampleSpec that changes the compiled program."""

  max_new_tokens: int
  greedy: bool
  top_k: int
  nucleus: bool


# ---------------------------------------------------------------------------------------------
# Choosing the next token


def sample_logits(logits: jax.Array, key: jax.Array, shape: DecodeShape,
                  knobs: dict) -> jax.Array:
  """Next token ids [B] from logits [B, V]: argmax if greedy, else temperature/top-k/top-p."""
  if shape.greedy:
    return _argmax(logits)
  logits = logits.astype(jnp.float32) / knobs["temperature"]
  if shape.top_k == 0 and not shape.nucleus:
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  k = min(shape.top_k or logits.shape[-1], logits.shape[-1])
  vals, ids = jax.lax.top_k(logits, k)  # sorted, largest first
  if shape.nucleus:
    probs = jax.nn.softmax(vals, axis=-1)
    # keep a token while the mass before it is under top_p, so the most likely always survives
    before = jnp.cumsum(probs, axis=-1) - probs
    vals = jnp.where(before < knobs["top_p"], vals, -jnp.inf)
  choice = jax.random.categorical(key, vals, axis=-1)
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _argmax(logits: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first maximum; the first NaN if any), as two plain
  reductions: XLA:CPU runs argmax's paired (value, index) reduction unvectorised, ~3x slower
  over a 262k vocabulary, where it cost ~1 ms per row and step."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  hit = (logits == top) | jnp.isnan(logits)
  iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  return jnp.min(jnp.where(hit, iota, logits.shape[-1]), axis=-1)


def is_stop(tok: jax.Array, stops: jax.Array) -> jax.Array:
  return jnp.any(tok[:, None] == stops[None, :], axis=-1)


# ---------------------------------------------------------------------------------------------
# Prefill and decode


def pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad to the next multiple of PROMPT_BUCKET; returns tokens [B, P] and lengths [B]."""
  if not prompts:
    raise ValueError("generate: got no prompts")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"generate: prompt {i} is empty; expected at least one token (BOS)")
  lengths = np.array([len(p) for p in prompts], np.int32)
  P = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths


def cache_dtype(params, cfg: ModelConfig):
  """The dtype keys and values are computed in, so that the cache rounds nothing the full
  forward does not: float32 with bfloat16 matmuls (they round their own inputs), else the
  params' dtype."""
  return jnp.float32 if cfg.matmul_dtype is not None else model.activation_dtype(params)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(params, lora, tokens, lengths, cfg: ModelConfig, cache_len: int):
  """Run right-padded prompts [B, P] through the model; logits at each row's last real token."""
  B, P = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  # pads get segment 0, which no real token (segment 1) ever attends to
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
  cache = model.init_cache(cfg, B, cache_len, cache_dtype(params, cfg))
  hidden, cache = model.hidden_states(params, tokens, cfg, lora=lora, positions=positions,
                                      segment_ids=segment_ids, cache=cache)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return model.logits_from_hidden(params, last, cfg), cache


@functools.partial(jax.jit, static_argnames=("cfg", "shape", "keep_logits"),
                   donate_argnames=("cache",))
def decode_batch(params, lora, cache, logits, lengths, key, knobs, cfg: ModelConfig,
                 shape: DecodeShape, keep_logits: bool):
  """Tokens [B, n] (pad after a stop token), plus every step's logits [B, n, V] if keep_logits."""
  B, n = lengths.shape[0], shape.max_new_tokens
  stops, pad = knobs["stop_ids"], knobs["pad_id"]
  first = sample_logits(logits, jax.random.fold_in(key, 0), shape, knobs)
  out = jnp.full((B, n), pad, jnp.int32).at[:, 0].set(first)
  seen = jnp.zeros((B, n if keep_logits else 0, logits.shape[-1]), jnp.float32)
  seen = seen.at[:, 0].set(logits) if keep_logits else seen
  state = (jnp.int32(1), out, is_stop(first, stops), cache, seen)

  def cond(state):
    i, _, done, _, _ = state
    return (i < n) & ~jnp.all(done)

  def body(state):
    i, out, done, cache, seen = state
    prev = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1)  # [B, 1]
    positions = (lengths + i - 1)[:, None]
    step_logits, cache = model.forward(params, prev, cfg, lora=lora, positions=positions,
                                       segment_ids=jnp.ones_like(prev), cache=cache)
    step_logits = step_logits[:, 0]
    tok = sample_logits(step_logits, jax.random.fold_in(key, i), shape, knobs)
    tok = jnp.where(done, pad, tok)
    out = jax.lax.dynamic_update_index_in_dim(out, tok, i, axis=1)
    if keep_logits:
      seen = jax.lax.dynamic_update_index_in_dim(seen, step_logits, i, axis=1)
    return i + 1, out, done | is_stop(tok, stops), cache, seen

  _, out, _, cache, seen = jax.lax.while_loop(cond, body, state)
  # returning the cache lets XLA reuse the donated input buffer instead of holding two copies
  return out, (seen if keep_logits else None), cache


@functools.partial(jax.jit, static_argnames=("cfg", "shape"), donate_argnames=("cache",))
def step(params, lora, cache, prev, position, key, knobs, cfg: ModelConfig, shape: DecodeShape):
  """One decode step for a batch of one: the next token after `prev` [1, 1] at `position`."""
  logits, cache = model.forward(params, prev, cfg, lora=lora, positions=position[None, None],
                                segment_ids=jnp.ones_like(prev), cache=cache)
  return sample_logits(logits[:, 0], key, shape, knobs), cache

