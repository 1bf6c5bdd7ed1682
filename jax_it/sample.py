"""KV-cache generation: a queue of prompts decoded through a fixed set of batch slots, in compiled
chunks of steps, finished rows replaced by the next prompts (`generate`); one batch in one compiled
loop (`generate_arrays`); or token by token for streaming (`stream`). Every loop stops a row at a
stop token (EOS, a chat format's turn terminator)."""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_it import model, ops, schema
from jax_it.model import ModelConfig, Params

# Prompts are right-padded to a multiple of this, so few prefill shapes are ever compiled.
PROMPT_BUCKET = 64
# `generate`'s KV cache is as long as its longest row needs for the next chunk, rounded up to a
# multiple of this: attention reads the whole cache every step, so a short cache is less work.
CACHE_BUCKET = 128


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
  cache = model.init_cache(cfg, B, cache_len, _cache_dtype(params, cfg))
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


# ---------------------------------------------------------------------------------------------
# A queue of prompts through a fixed set of slots
#
# `generate` keeps `batch` rows in flight. The compiled loop runs `chunk` steps at a time; between
# chunks the host drops the rows that stopped, gives their slots to the next prompts and lays the
# cache out again, so a stopped row costs at most the rest of its chunk, and a long row never holds
# up a batch. A prompt's last token is not prefilled: the loop feeds it as its first step, so a
# row that just joined and one that is halfway through run the same step. Cache layout after each
# re-layout: slot s of a row holds its position s (the prompt from slot 0, then what it generated),
# every row's next token goes to the shared write index (the longest row's length), and the slots
# between a shorter row's end and that index are masked (segment 0).


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prepare(params, cfg: ModelConfig) -> dict:
  """The weights as the decode loop reads them, made once per `generate` call rather than once
  per compiled call: stacked layers and the embedding rows to gather from, in `ops.carry` form
  (on XLA:CPU a loop that slices or gathers a bfloat16 array otherwise first converts all of it
  to float32, ~0.4 s for the 270M's table, every call), and the table for the output projection."""
  return {"layers": ops.carry(params["layers"], cfg.kernels),
          "rows": ops.carry(params["embedder"], cfg.kernels),
          "embedder": params["embedder"], "final_norm": params["final_norm"]}


def _cache_dtype(params, cfg: ModelConfig):
  """The dtype keys and values are computed in, so that the cache rounds nothing the full
  forward does not: float32 with bfloat16 matmuls (they round their own inputs), else the
  params' dtype."""
  return jnp.float32 if cfg.matmul_dtype is not None else model.activation_dtype(params)


def _hidden(prep, lora, tokens, positions, segment_ids, cache, cfg: ModelConfig):
  """model.hidden_states of `tokens` [B, T], the embedding rows gathered here from the carried
  table and handed over as a [B*T]-row table, so the loop never indexes the full table."""
  B, T = tokens.shape
  rows = jax.tree.map(lambda t: ops.gather(t, tokens.reshape(-1)), prep["rows"])
  p = {"embedder": rows, "layers": prep["layers"], "final_norm": prep["final_norm"]}
  ids = jnp.arange(B * T, dtype=jnp.int32).reshape(B, T)
  return model.hidden_states(p, ids, cfg, lora=lora, positions=positions,
                             segment_ids=segment_ids, cache=cache)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _fill(prep, lora, tokens, lengths, cfg: ModelConfig, dtype) -> dict:
  """The keys and values [L, B, P, K, H] of right-padded prompts [B, P] (lengths [B] may be 0)."""
  B, P = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
  cache = model.init_cache(cfg, B, P, dtype)
  _, cache = _hidden(prep, lora, tokens, positions, segment_ids, cache, cfg)
  return {"k": cache["k"], "v": cache["v"]}


@functools.partial(jax.jit, static_argnames=("length",))
def _relayout(old, new, old_row, old_slot, new_row, from_new, lengths, length: int) -> dict:
  """The cache of the next chunk: row b's slot s is old[old_row[b], old_slot[b, s]] or, where
  from_new[b], new[new_row[b], s]; `lengths` [B] slots of each row hold tokens, the write
  index is the longest. old or new may be None."""
  B = old_row.shape[0]
  slots = jnp.arange(length, dtype=jnp.int32)
  parts = []
  if old is not None:
    parts.append({n: old[n][:, old_row[:, None], old_slot] for n in ("k", "v")})
  if new is not None:
    s = jnp.minimum(slots, new["k"].shape[2] - 1)
    parts.append({n: new[n][:, new_row[:, None], s[None, :]] for n in ("k", "v")})
  kv = parts[0] if len(parts) == 1 else jax.tree.map(
      lambda a, b: jnp.where(from_new[None, :, None, None, None], b, a), *parts)
  return {**kv, "pos": jnp.broadcast_to(slots, (B, length)),
          "seg": (slots[None, :] < lengths[:, None]).astype(jnp.int32),
          "index": jnp.max(lengths)}


def _sample_rows(logits, seeds, counts, shape: DecodeShape, knobs: dict) -> jax.Array:
  """Next tokens [B]: row b's draw uses fold_in(key(seeds[b]), counts[b]), the key that
  `generate_arrays` and `stream` use for a batch of one with that seed, so that a row's tokens do
  not depend on which rows share its batch."""
  if shape.greedy:
    return sample_logits(logits, None, shape, knobs)

  def one(row, seed, i):
    key = jax.random.fold_in(jax.random.key(seed), i)
    return sample_logits(row[None], key, shape, knobs)[0]

  return jax.vmap(one)(logits, seeds, counts)


@functools.partial(jax.jit, static_argnames=("cfg", "shape", "steps"),
                   donate_argnames=("cache",))
def _chunk(prep, lora, cache, rows, knobs, until, cfg: ModelConfig, shape: DecodeShape,
           steps: int):
  """Decode steps of every row until `steps` ran or `until` rows have stopped: the steps run,
  the tokens sampled [B, steps] (pad where a row had stopped), the rows' state, and the cache.

  rows: tok [B] (fed next), pos [B] (its position), count [B] (tokens sampled so far), limit [B]
  (max new tokens), done [B] (stopped, or an empty slot), seed [B] (its sampling key's seed).
  """
  B = rows["tok"].shape[0]
  pad, stops = knobs["pad_id"], knobs["stop_ids"]
  out = jnp.full((B, steps), pad, jnp.int32)

  def cond(state):
    j, rows, _, _ = state
    return (j < steps) & (jnp.sum(rows["done"]) < until)

  def body(state):
    j, rows, out, cache = state
    hidden, cache = _hidden(prep, lora, rows["tok"][:, None], rows["pos"][:, None],
                            jnp.ones((B, 1), jnp.int32), cache, cfg)
    logits = model.logits_from_hidden(prep, hidden[:, 0], cfg)
    tok = _sample_rows(logits, rows["seed"], rows["count"], shape, knobs)
    tok = jnp.where(rows["done"], pad, tok)
    count = rows["count"] + (~rows["done"]).astype(jnp.int32)
    done = rows["done"] | _is_stop(tok, stops) | (count >= rows["limit"])
    rows = dict(rows, tok=tok, pos=rows["pos"] + 1, count=count, done=done)
    return j + 1, rows, jax.lax.dynamic_update_index_in_dim(out, tok, j, axis=1), cache

  ran, rows, out, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), rows, out, cache))
  return ran, out, rows, cache


def _round_up(n: int, m: int) -> int:
  return max(m, -(-n // m) * m)


def _batch_size(rows: int, batch: int) -> int:
  """The slots a chunk runs: `batch` while prompts wait, else the smallest power of two (at
  least 2: XLA:CPU runs a 1-row bfloat16 matmul as a float32 one, slower than 2 rows) that
  holds the rows left, so few shapes compile and a draining batch stops paying for empty rows."""
  size = 2
  while size < rows:
    size *= 2
  return min(size, batch)


def _until(rows: int, size: int, waiting: bool) -> int:
  """How many stopped slots end a chunk early (empty slots count as stopped): while prompts
  wait, the first eighth of the batch to stop (a prefill and a re-layout cost about as much as
  a step or two, a slot left empty one row-step per step); else half of it, when the rows left
  fit the next smaller batch; else all."""
  if waiting:
    return size - rows + max(1, size // 8)
  return size - size // 2 if size > 2 else size


@dataclasses.dataclass
class _Row:
  """A prompt in flight: its index, the tokens it generated, and where its cache stands."""

  index: int
  tokens: list[int]
  length: int  # positions 0..length-1 are in the cache
  slot: int = -1  # its row in the current cache
  ends: int = 0  # the write index when the last chunk began: its last `ran` positions are there
  ran: int = 0  # steps the last chunk ran


def _queue(params: Params, cfg: ModelConfig, prompts: list[list[int]], lora, spec: SampleSpec,
           batch: int, chunk: int) -> list[list[int]]:
  """The new tokens of every prompt (through its stop token), `batch` rows at a time."""
  if batch < 1 or chunk < 1:
    raise ValueError(f"generate: batch={batch}, chunk={chunk}; expected both >= 1")
  prep, dtype = _prepare(params, cfg), _cache_dtype(params, cfg)
  shape = dataclasses.replace(spec.shape, max_new_tokens=0)  # limits travel as data
  queue = collections.deque(range(len(prompts)))
  done: dict[int, list[int]] = {}
  live: list[_Row] = []
  cache = None
  while queue or live:
    fresh = [queue.popleft() for _ in range(min(len(queue), batch - len(live)))]
    size = batch if queue else _batch_size(len(live) + len(fresh), batch)
    new = _fill_rows(prep, lora, cfg, dtype, [prompts[i] for i in fresh], spec.pad_id)
    rows = live + [_Row(i, [], len(prompts[i]) - 1) for i in fresh]
    cache = _layout(cache, new, rows, len(live), size, chunk)
    state = _state(rows, prompts, size, spec)
    ran, out, state, cache = _chunk(prep, lora, cache, state, spec.knobs,
                                    jnp.int32(_until(len(rows), size, bool(queue))), cfg, shape,
                                    chunk)
    ran, out, counts, stopped = jax.device_get((ran, out, state["count"], state["done"]))
    live = []
    for b, row in enumerate(rows):
      row.tokens += out[b, :counts[b] - len(row.tokens)].tolist()
      row.length, row.ran = row.length + int(ran), int(ran)
      if stopped[b]:
        done[row.index] = row.tokens
      else:
        live.append(row)
  return [done[i] for i in range(len(prompts))]


def _fill_rows(prep, lora, cfg, dtype, prompts, pad_id):
  """The prefilled cache of each new prompt but its last token, in a batch of a power of two."""
  if not prompts:
    return None
  heads = [p[:-1] for p in prompts]
  tokens, lengths = _pad_prompts([h or [pad_id] for h in heads], pad_id)
  lengths = np.array([len(h) for h in heads], np.int32)
  rows = _batch_size(len(prompts), 1 << 30)
  tokens = np.pad(tokens, ((0, rows - len(prompts)), (0, 0)), constant_values=pad_id)
  lengths = np.pad(lengths, (0, rows - len(prompts)))
  return _fill(prep, lora, jnp.asarray(tokens), jnp.asarray(lengths), cfg, dtype)


def _layout(cache, new, rows: list[_Row], n_old: int, size: int, chunk: int) -> dict:
  """The next chunk's cache: rows[:n_old] moved from `cache`, the rest from `new` (in order),
  each left-aligned, as long as the longest row plus `chunk` needs (in CACHE_BUCKETs)."""
  lengths = np.zeros(size, np.int32)
  lengths[:len(rows)] = [r.length for r in rows]
  length = _round_up(int(lengths.max()) + chunk, CACHE_BUCKET)
  old_row, new_row = np.zeros(size, np.int32), np.zeros(size, np.int32)
  old_slot = np.zeros((size, length), np.int32)
  from_new = np.zeros(size, bool)
  slots = np.arange(length)
  for b, row in enumerate(rows):
    if b < n_old:  # positions before the last chunk sit at their own slots, its tokens after `ends`
      before = row.length - row.ran
      old_row[b] = row.slot
      old_slot[b] = np.where(slots < before, slots, row.ends + slots - before)
      old_slot[b, row.length:] = 0
    else:
      new_row[b], from_new[b] = b - n_old, True
    row.slot, row.ends = b, int(lengths.max())
  old = cache if n_old else None
  if old is not None:
    old = {"k": old["k"], "v": old["v"]}
  return _relayout(old, new, jnp.asarray(old_row), jnp.asarray(old_slot), jnp.asarray(new_row),
                   jnp.asarray(from_new), jnp.asarray(lengths), length)


def _state(rows: list[_Row], prompts, size: int, spec: SampleSpec) -> dict:
  """The rows' loop state (see `_chunk`); slots past the rows are empty (done)."""
  tok, count = np.full(size, spec.pad_id, np.int32), np.zeros(size, np.int32)
  seed, done = np.zeros(size, np.uint32), np.ones(size, bool)
  for b, row in enumerate(rows):
    tok[b] = row.tokens[-1] if row.tokens else prompts[row.index][-1]
    count[b], done[b] = len(row.tokens), False
    seed[b] = (spec.seed + row.index) % 2**32
  pos = np.zeros(size, np.int32)
  pos[:len(rows)] = [r.length for r in rows]
  limit = np.full(size, spec.max_new_tokens, np.int32)
  return {k: jnp.asarray(v) for k, v in dict(tok=tok, pos=pos, count=count, limit=limit,
                                                 done=done, seed=seed).items()}


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
             seed: int = 0, batch: int = 16, chunk: int = 32) -> list[list[int]]:
  """New token ids per prompt (prompt excluded), cut after the first stop token, which is kept.

  eos_id: the stop token id, or several (EOS and a turn terminator); None never stops early.
  A row that ends without a stop token ran out of max_new_tokens. All prompts share `batch`
  slots (pass them all in one call: a slot freed by a stopped row takes the next prompt), and
  the host looks at them every `chunk` steps. Greedy tokens do not depend on batch or chunk;
  sampling draws prompt j's tokens with seed `seed + j`, as a call with that prompt alone
  would (and `stream` with that seed), whatever shares its batch.
  """
  spec = SampleSpec(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                    top_k=int(top_k), top_p=float(top_p), seed=int(seed),
                    stop_ids=_stops(eos_id), pad_id=int(pad_id))
  _pad_prompts(prompts, spec.pad_id)  # the same checks as every path
  if spec.max_new_tokens == 0:
    return [[] for _ in prompts]
  return _queue(params, cfg, prompts, lora, spec, int(batch), int(chunk))


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
