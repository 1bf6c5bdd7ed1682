"""A queue of prompts decoded through a fixed set of batch slots (`sample.generate`'s engine).

The compiled loop runs `chunk` steps at a time; between chunks the host drops the rows that
stopped, gives their slots to the next prompts and lays the cache out again, so a stopped row
costs at most the rest of its chunk, and a long row never holds up a batch. A prompt's last token
is not prefilled: the loop feeds it as its first step, so a row that just joined and one that is
halfway through run the same step. Cache layout after each re-layout: slot s of a row holds its
position s (the prompt from slot 0, then what it generated), every row's next token goes to the
shared write index (the longest row's length), and the slots between a shorter row's end and that
index are masked (segment 0)."""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jax_it import decode, model, ops
from jax_it.model import ModelConfig, Params

if TYPE_CHECKING:
  from jax_it import sample

# The KV cache is as long as its longest row needs for the next chunk, rounded up to a multiple
# of this: attention reads the whole cache every step, so a short cache is less work.
CACHE_BUCKET = 128
# Prompts that join a batch are prefilled this many at a time (one shape to compile).
FILL_ROWS = 4


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prepare(params, cfg: ModelConfig) -> dict:
  """The weights as the decode loop reads them, made once per `generate` call rather than once
  per compiled call: stacked layers and the embedding rows to gather from, in `ops.carry` form
  (on XLA:CPU a loop that slices or gathers a bfloat16 array otherwise first converts all of it
  to float32, ~0.4 s for the 270M's table, every call), and the table for the output projection."""
  return {"layers": ops.carry(params["layers"], cfg.kernels),
          "rows": ops.carry(params["embedder"], cfg.kernels),
          "embedder": params["embedder"], "final_norm": params["final_norm"]}


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


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "length"))
def _relayout(old, old_row, old_slot, lengths, cfg: ModelConfig, dtype, length: int) -> dict:
  """The cache of the next chunk: row b's slot s is old[old_row[b], old_slot[b, s]] (zeros if
  old is None, for rows `_insert` fills); `lengths` [B] slots of each row hold tokens, the write
  index is the longest."""
  B = old_row.shape[0]
  slots = jnp.arange(length, dtype=jnp.int32)
  if old is None:
    kv = {n: a for n, a in model.init_cache(cfg, B, length, dtype).items() if n in ("k", "v")}
  else:
    kv = {n: old[n][:, old_row[:, None], old_slot] for n in ("k", "v")}
  return {**kv, "pos": jnp.broadcast_to(slots, (B, length)),
          "seg": (slots[None, :] < lengths[:, None]).astype(jnp.int32),
          "index": jnp.max(lengths)}


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert(cache, new, rows) -> dict:
  """The cache with new[:, i] (a `_fill` of P slots) as the first P slots of row rows[i]."""
  P = new["k"].shape[2]
  return dict(cache, **{n: cache[n].at[:, rows, :P].set(new[n]) for n in ("k", "v")})


def _sample_rows(logits, seeds, counts, shape: decode.DecodeShape, knobs: dict) -> jax.Array:
  """Next tokens [B]: row b's draw uses fold_in(key(seeds[b]), counts[b]), the key that
  `generate_arrays` and `stream` use for a batch of one with that seed, so that a row's tokens do
  not depend on which rows share its batch."""
  if shape.greedy:
    return decode.sample_logits(logits, None, shape, knobs)

  def one(row, seed, i):
    key = jax.random.fold_in(jax.random.key(seed), i)
    return decode.sample_logits(row[None], key, shape, knobs)[0]

  return jax.vmap(one)(logits, seeds, counts)


@functools.partial(jax.jit, static_argnames=("cfg", "shape", "steps"),
                   donate_argnames=("cache",))
def _chunk(prep, lora, cache, rows, knobs, until, cfg: ModelConfig, shape: decode.DecodeShape,
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
    done = rows["done"] | decode.is_stop(tok, stops) | (count >= rows["limit"])
    rows = dict(rows, tok=tok, pos=rows["pos"] + 1, count=count, done=done)
    return j + 1, rows, jax.lax.dynamic_update_index_in_dim(out, tok, j, axis=1), cache

  ran, rows, out, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), rows, out, cache))
  return ran, out, rows, cache


def _round_up(n: int, m: int) -> int:
  return max(m, -(-n // m) * m)


def _batch_size(rows: int, batch: int) -> int:
  """The slots a chunk runs once no prompt waits: `batch`, or a quarter of it (a sixteenth,
  ...; at least 2: XLA:CPU runs a 1-row bfloat16 matmul as a float32 one, slower than 2 rows)
  when the rows left fit. A step's cost is mostly the weights', whatever the rows, so a smaller
  batch saves a share only when it is much smaller; each size compiles the loop again."""
  size = batch
  while rows <= size // 4 and size // 4 >= 2:
    size //= 4
  return size


def _until(rows: int, size: int, waiting: bool) -> int:
  """How many stopped slots end a chunk early (empty slots count as stopped): while prompts
  wait, the first eighth of the batch to stop (a prefill and a re-layout cost about as much as
  a step or two, a slot left empty one row-step per step); else enough that the rows left fit
  the next smaller batch; else all."""
  if waiting:
    return size - rows + max(1, size // 8)
  return size - size // 4 if size // 4 >= 2 else size


@dataclasses.dataclass
class _Row:
  """A prompt in flight: its index, the tokens it generated, and where its cache stands."""

  index: int
  tokens: list[int]
  length: int  # positions 0..length-1 are in the cache
  slot: int = -1  # its row in the current cache
  ends: int = 0  # the write index when the last chunk began: its last `ran` positions are there
  ran: int = 0  # steps the last chunk ran


def run(params: Params, cfg: ModelConfig, prompts: list[list[int]], lora,
        spec: sample.SampleSpec, batch: int, chunk: int) -> list[list[int]]:
  """The new tokens of every prompt (through its stop token), `batch` rows at a time."""
  if batch < 1 or chunk < 1:
    raise ValueError(f"generate: batch={batch}, chunk={chunk}; expected both >= 1")
  prep, dtype = _prepare(params, cfg), decode.cache_dtype(params, cfg)
  shape = dataclasses.replace(spec.shape, max_new_tokens=0)  # limits travel as data
  queue = collections.deque(range(len(prompts)))
  done: dict[int, list[int]] = {}
  live: list[_Row] = []
  cache, length = None, 0
  while queue or live:
    fresh = [queue.popleft() for _ in range(min(len(queue), batch - len(live)))]
    size = batch if queue else _batch_size(len(live) + len(fresh), batch)
    rows = live + [_Row(i, [], len(prompts[i]) - 1) for i in fresh]
    same = cache is not None and cache["k"].shape[1] == size
    length = _cache_length(rows, size, batch, length if same else 0, bool(queue), chunk, spec)
    cache = _layout(cache, rows, len(live), size, length, cfg, dtype)
    cache = _fill_rows(prep, lora, cfg, dtype, cache, rows[len(live):], prompts, spec.pad_id)
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


def _cache_length(rows: list[_Row], size: int, batch: int, current: int, waiting: bool,
                  chunk: int, spec: sample.SampleSpec) -> int:
  """Slots the next chunk's cache needs, in CACHE_BUCKETs: the longest row plus a chunk while
  prompts wait (attention reads every slot, so it grows with the rows); once the batch has
  shrunk, what the rows could still write, and no new length after that (one compile a size)."""
  longest = max(r.length for r in rows)
  if waiting or size == batch:
    return _round_up(longest + chunk, CACHE_BUCKET)
  need = longest + max(spec.max_new_tokens - len(r.tokens) for r in rows)
  return current if current >= need else _round_up(need, CACHE_BUCKET)


def _fill_rows(prep, lora, cfg, dtype, cache, rows: list[_Row], prompts, pad_id):
  """The cache with each new row's prompt but its last token prefilled, FILL_ROWS prompts a
  call (a short group repeats its last prompt, written twice alike), so one program a prompt
  bucket serves every refill."""
  for g in range(0, len(rows), FILL_ROWS):
    group = rows[g:g + FILL_ROWS]
    group += group[-1:] * (FILL_ROWS - len(group))
    heads = [prompts[r.index][:-1] for r in group]
    tokens, _ = decode.pad_prompts([h or [pad_id] for h in heads], pad_id)
    lengths = np.array([len(h) for h in heads], np.int32)
    new = _fill(prep, lora, jnp.asarray(tokens), jnp.asarray(lengths), cfg, dtype)
    cache = _insert(cache, new, jnp.asarray([r.slot for r in group], jnp.int32))
  return cache


def _layout(cache, rows: list[_Row], n_old: int, size: int, length: int, cfg, dtype) -> dict:
  """The next chunk's cache of `length` slots: rows[:n_old] moved from `cache` and
  left-aligned; the rest empty, for `_fill_rows`. Sets each row's slot and write index."""
  lengths = np.zeros(size, np.int32)
  lengths[:len(rows)] = [r.length for r in rows]
  old_row = np.zeros(size, np.int32)
  old_slot = np.zeros((size, length), np.int32)
  slots = np.arange(length)
  for b, row in enumerate(rows[:n_old]):
    # positions before the last chunk sit at their own slots, its `ran` tokens from `ends` on
    before = row.length - row.ran
    old_row[b] = row.slot
    old_slot[b] = np.where(slots < before, slots, row.ends + slots - before)
    old_slot[b, row.length:] = 0
  for b, row in enumerate(rows):
    row.slot, row.ends = b, int(lengths.max())
  if n_old:
    old = {"k": cache["k"], "v": cache["v"]}
  else:  # shapes only: nothing to move
    old = None
  return _relayout(old, jnp.asarray(old_row), jnp.asarray(old_slot), jnp.asarray(lengths), cfg,
                   dtype, length)


def _state(rows: list[_Row], prompts, size: int, spec: sample.SampleSpec) -> dict:
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

