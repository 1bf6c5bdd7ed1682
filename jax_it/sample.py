"""Generation: a queue of prompts decoded through refilled batch slots (`generate`, all prompts
in one call; `decode_queue` runs it), one batch in one compiled loop (`generate_arrays`), or token
by token for streaming (`stream`). Every path stops a row at a stop token (EOS, a chat format's
turn terminator)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_it import decode, decode_queue, schema
from jax_it import lora as lora_lib
from jax_it.decode import DecodeShape, sample_logits  # noqa: F401  (the public names)
from jax_it.model import ModelConfig, Params


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


def generate_arrays(params: Params, cfg: ModelConfig, prompts: list[list[int]], *,
                    lora=None, spec: SampleSpec = SampleSpec(), seed: int = 0,
                    keep_logits: bool = False):
  """Array-level generation: tokens [B, n] (pad after a stop) and, if asked, logits [B, n, V]."""
  tokens, lengths = decode.pad_prompts(prompts, spec.pad_id)
  if spec.max_new_tokens == 0:
    return np.zeros((len(prompts), 0), np.int32), None
  cache_len = tokens.shape[1] + spec.max_new_tokens
  lora = lora_lib.fold_norms(lora, params)
  logits, cache = decode.prefill(params, lora, jnp.asarray(tokens), jnp.asarray(lengths), cfg,
                                 cache_len)
  out, seen, _ = decode.decode_batch(params, lora, cache, logits, jnp.asarray(lengths),
                                     jax.random.key(seed), spec.knobs, cfg, spec.shape,
                                     keep_logits)
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
  decode.pad_prompts(prompts, spec.pad_id)  # the same checks as every path
  if spec.max_new_tokens == 0:
    return [[] for _ in prompts]
  return decode_queue.run(params, cfg, prompts, lora_lib.fold_norms(lora, params), spec,
                          int(batch), int(chunk))


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


def stream(params: Params, cfg: ModelConfig, prompt: list[int], *, lora=None,
           spec: SampleSpec = SampleSpec()) -> Iterator[int]:
  """The new token ids of one prompt, one at a time as they are sampled; stops after a stop
  token (yielded) or max_new_tokens. Same tokens as `generate` for the same spec and seed."""
  tokens, lengths = decode.pad_prompts([prompt], spec.pad_id)
  n = spec.max_new_tokens
  if n == 0:
    return
  lora = lora_lib.fold_norms(lora, params)
  logits, cache = decode.prefill(params, lora, jnp.asarray(tokens), jnp.asarray(lengths), cfg,
                                 tokens.shape[1] + n)
  key, knobs, shape = jax.random.key(spec.seed), spec.knobs, spec.shape
  tok = sample_logits(logits, jax.random.fold_in(key, 0), shape, knobs)
  for i in range(1, n + 1):
    t = int(tok[0])
    yield t
    if t in spec.stop_ids or i == n:
      return
    tok, cache = decode.step(params, lora, cache, tok[:, None], jnp.int32(len(prompt) + i - 1),
                             jax.random.fold_in(key, i), knobs, cfg, shape)
