"""KV-cache generation: one jitted prefill, then a compiled decode loop that stops at a stop
token (EOS, a chat format's turn terminator); or token by token for streaming (`stream`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_it import model, schema
from jax_it.model import ModelConfig, Params

# Prompts are right-padded to a multiple of this, so few prefill shapes are ever compiled.
PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """The `generate` section: decoding settings. Only `shape` is compiled in; the rest travels
  as traced `knobs`. The token ids come from the tokenizer, not from users."""

  SECTION: ClassVar[str] = "generate"
  max_new_tokens: int = schema.field(128, check=schema.NON_NEGATIVE)
  temperature: float = schema.field(0.0, check=schema.NON_NEGATIVE)  # 0: greedy
  top_k: int = schema.field(0, check=schema.NON_NEGATIVE)  # 0: no top-k filter
  top_p: float = schema.field(1.0, check=schema.PROBABILITY)
  seed: int = schema.field(0, check=schema.SEED)
  stop_ids: tuple[int, ...] = schema.field((1,), internal=True)  # (): never stop early
  pad_id: int = schema.field(0, internal=True)

  def __post_init__(self):
    schema.validate(self)

  @property
  def shape(self) -> DecodeShape:
    return DecodeShape(self.max_new_tokens, self.temperature == 0.0, self.top_k, self.top_p < 1.0)

  @property
  def knobs(self) -> dict:
    return {"temperature": jnp.float32(self.temperature or 1.0), "top_p": jnp.float32(self.top_p),
            "stop_ids": jnp.asarray(self.stop_ids or (-1,), jnp.int32),
            "pad_id": jnp.int32(self.pad_id)}


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
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
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


def _is_stop(tok: jax.Array, stops: jax.Array) -> jax.Array:
  return jnp.any(tok[:, None] == stops[None, :], axis=-1)


# ---------------------------------------------------------------------------------------------
# Prefill and decode


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill(params, lora, tokens, lengths, cfg: ModelConfig, cache_len: int):
  """Run right-padded prompts [B, P] through the model; logits at each row's last real token."""
  B, P = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  # pads get segment 0, which no real token (segment 1) ever attends to
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
  dtype = model.activation_dtype(params)
  cache = model.init_cache(cfg, B, cache_len, dtype)
  hidden, cache = model.hidden_states(params, tokens, cfg, lora=lora, positions=positions,
                                      segment_ids=segment_ids, cache=cache)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return model.logits_from_hidden(params, last, cfg), cache


@functools.partial(jax.jit, static_argnames=("cfg", "shape", "keep_logits"),
                   donate_argnames=("cache",))
def _decode(params, lora, cache, logits, lengths, key, knobs, cfg: ModelConfig,
            shape: DecodeShape, keep_logits: bool):
  """Tokens [B, n] (pad after a stop token), plus every step's logits [B, n, V] if keep_logits."""
  B, n = lengths.shape[0], shape.max_new_tokens
  stops, pad = knobs["stop_ids"], knobs["pad_id"]
  first = sample_logits(logits, jax.random.fold_in(key, 0), shape, knobs)
  out = jnp.full((B, n), pad, jnp.int32).at[:, 0].set(first)
  seen = jnp.zeros((B, n if keep_logits else 0, logits.shape[-1]), jnp.float32)
  seen = seen.at[:, 0].set(logits) if keep_logits else seen
  state = (jnp.int32(1), out, _is_stop(first, stops), cache, seen)

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
    return i + 1, out, done | _is_stop(tok, stops), cache, seen

  _, out, _, cache, seen = jax.lax.while_loop(cond, body, state)
  # returning the cache lets XLA reuse the donated input buffer instead of holding two copies
  return out, (seen if keep_logits else None), cache


def _pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
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


def generate_arrays(params: Params, cfg: ModelConfig, prompts: list[list[int]], *,
                    lora=None, spec: SampleSpec = SampleSpec(), seed: int = 0,
                    keep_logits: bool = False):
  """Array-level generation: tokens [B, n] (pad after a stop) and, if asked, logits [B, n, V]."""
  tokens, lengths = _pad_prompts(prompts, spec.pad_id)
  if spec.max_new_tokens == 0:
    return np.zeros((len(prompts), 0), np.int32), None
  cache_len = tokens.shape[1] + spec.max_new_tokens
  logits, cache = _prefill(params, lora, jnp.asarray(tokens), jnp.asarray(lengths), cfg,
                           cache_len)
  out, seen, _ = _decode(params, lora, cache, logits, jnp.asarray(lengths),
                         jax.random.key(seed), spec.knobs, cfg, spec.shape, keep_logits)
  return np.asarray(out), (None if seen is None else np.asarray(seen))


def _cut_at_stop(row: np.ndarray, stops: Sequence[int]) -> list[int]:
  hits = np.flatnonzero(np.isin(row, list(stops)))
  return row[:hits[0] + 1].tolist() if hits.size else row.tolist()


def _stops(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
  if eos_id is None:
    return ()
  return (int(eos_id),) if np.ndim(eos_id) == 0 else tuple(int(i) for i in eos_id)


def generate(params: Params, cfg: ModelConfig, prompts: list[list[int]], *, lora=None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | Sequence[int] | None = 1, pad_id: int = 0,
             seed: int = 0) -> list[list[int]]:
  """New token ids per prompt (prompt excluded), cut after the first stop token, which is kept.

  eos_id: the stop token id, or several (EOS and a turn terminator); None never stops early.
  A row that ends without a stop token ran out of max_new_tokens.
  """
  spec = SampleSpec(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                    top_k=int(top_k), top_p=float(top_p), seed=int(seed),
                    stop_ids=_stops(eos_id), pad_id=int(pad_id))
  out, _ = generate_arrays(params, cfg, prompts, lora=lora, spec=spec, seed=seed)
  return [_cut_at_stop(row, spec.stop_ids) for row in out]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
  """BOS + the prompt's tokens (special-token markers in it become their ids)."""
  if tokenizer.bos_token_id is None:
    raise ValueError("the tokenizer has no bos_token_id; expected Gemma's BOS")
  return [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)


def generate_text(params: Params, cfg: ModelConfig, tokenizer, prompts: list[str],
                  **kw) -> list[tuple[str, bool]]:
  """(response text, ended with a stop token) per prompt; prompts get BOS. `eos_id` defaults to
  the tokenizer's EOS; pass a chat format's stop ids (templates.stop_ids) to stop at turn ends."""
  kw.setdefault("eos_id", tokenizer.eos_token_id)
  if tokenizer.pad_token_id is not None:
    kw.setdefault("pad_id", tokenizer.pad_token_id)
  stops = _stops(kw["eos_id"])
  results = []
  for row in generate(params, cfg, [prompt_ids(tokenizer, p) for p in prompts], **kw):
    stopped = bool(row) and row[-1] in stops
    text = tokenizer.decode(row[:-1] if stopped else row, skip_special_tokens=True)
    results.append((text, stopped))
  return results


# ---------------------------------------------------------------------------------------------
# Streaming


@functools.partial(jax.jit, static_argnames=("cfg", "shape"), donate_argnames=("cache",))
def _step(params, lora, cache, prev, position, key, knobs, cfg: ModelConfig, shape: DecodeShape):
  """One decode step for a batch of one: the next token after `prev` [1, 1] at `position`."""
  logits, cache = model.forward(params, prev, cfg, lora=lora, positions=position[None, None],
                                segment_ids=jnp.ones_like(prev), cache=cache)
  return sample_logits(logits[:, 0], key, shape, knobs), cache


def stream(params: Params, cfg: ModelConfig, prompt: list[int], *, lora=None,
           spec: SampleSpec = SampleSpec()) -> Iterator[int]:
  """The new token ids of one prompt, one at a time as they are sampled; stops after a stop
  token (yielded) or max_new_tokens. Same tokens as `generate` for the same spec and seed."""
  tokens, lengths = _pad_prompts([prompt], spec.pad_id)
  n = spec.max_new_tokens
  if n == 0:
    return
  logits, cache = _prefill(params, lora, jnp.asarray(tokens), jnp.asarray(lengths), cfg,
                           tokens.shape[1] + n)
  key, knobs, shape = jax.random.key(spec.seed), spec.knobs, spec.shape
  tok = sample_logits(logits, jax.random.fold_in(key, 0), shape, knobs)
  for i in range(1, n + 1):
    t = int(tok[0])
    yield t
    if t in spec.stop_ids or i == n:
      return
    tok, cache = _step(params, lora, cache, tok[:, None], jnp.int32(len(prompt) + i - 1),
                       jax.random.fold_in(key, i), knobs, cfg, shape)
