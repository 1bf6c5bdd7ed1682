"""The model side of `run.py serve`: one worker thread owns every JAX call.

Requests wait in one queue. Each turn the worker takes every pending request: the non-streaming
ones with the same model and sampling settings decode together in one `sample.generate` call
(its slots refill as rows stop; the call runs to the group's largest max_tokens and each request
is cut at its own), then every open stream advances by one token (`sample.stream`, one row per
stream, taken in turn). A sampled request that gives a seed decodes alone, so its tokens are
the ones a lone call with that seed draws; greedy ones batch whatever their seeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import random
import threading

from jax_it import sample


@dataclasses.dataclass
class Job:
  """One request: its prompts (token ids with BOS), settings, and where its answer goes."""

  model: str  # "base" or "tuned"
  prompts: list[list[int]]
  max_tokens: int
  temperature: float
  top_p: float
  top_k: int
  seed: int | None
  stop: tuple[str, ...]
  stream: bool
  loop: asyncio.AbstractEventLoop
  future: asyncio.Future | None = None  # non-streaming: a list of Result, one per prompt
  events: asyncio.Queue | None = None  # streaming: ("text", str) ... then ("end", Result)
  stream_options: dict | None = None
  cancelled: bool = False  # the client went away: decode no further

  def group(self):
    """The key of the requests that can share one generate call."""
    alone = self.temperature > 0 and self.seed is not None
    return (self.model, self.temperature, self.top_p if self.temperature else 1.0,
            self.top_k if self.temperature else 0, id(self) if alone else None)


@dataclasses.dataclass
class Result:
  text: str
  finish_reason: str  # "stop" (a stop token or stop string) or "length" (max_tokens)
  prompt_tokens: int
  completion_tokens: int


class Text:
  """A reply's text as its tokens arrive: decoded whole each time, cut at the first stop string;
  `safe` is what can be shown now (no half a UTF-8 character, no start of a stop string)."""

  def __init__(self, tokenizer, lock: threading.Lock, stop: tuple[str, ...]):
    self.tokenizer, self.lock, self.stop = tokenizer, lock, stop
    self.ids: list[int] = []
    self.text, self.stopped = "", False

  def add(self, ids: list[int]) -> None:
    self.ids += ids
    with self.lock:
      text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
    self.text, self.stopped = (text[:min(hits)], True) if hits else (text, False)

  @property
  def safe(self) -> str:
    text = self.text.rstrip("\ufffd")
    if self.stopped:
      return text
    # hold back a tail that may grow into a stop string
    hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold]


class Engine:
  """The worker thread and its queue. `submit` is called from the event loop; results come back
  to it through `loop.call_soon_threadsafe`."""

  def __init__(self, ctx, adapter, stop_ids: tuple[int, ...], max_pending: int = 64,
               batch: int = 16):
    self.ctx, self.stop_ids, self.max_pending, self.batch = ctx, stop_ids, max_pending, batch
    self.loras = {"base": None, "tuned": adapter}
    self.tok_lock = threading.Lock()  # the tokenizer is shared with the HTTP thread
    self.inbox: queue.Queue = queue.Queue()
    self.streams: list = []
    self.generate_calls = 0  # how many batches the non-streaming requests took (see /health)
    self.thread = threading.Thread(target=self._loop, name="jax-worker", daemon=True)

  def start(self) -> Engine:
    self.thread.start()
    return self

  def pending(self) -> int:
    return self.inbox.qsize() + len(self.streams)

  def submit(self, job: Job) -> Job:
    if job.stream:
      job.events = asyncio.Queue()
    else:
      job.future = job.loop.create_future()
    self.inbox.put(job)
    return job

  def stop(self) -> None:
    self.inbox.put(None)

  # -- the worker thread ------------------------------------------------------------------------

  def _loop(self) -> None:
    while True:
      jobs = [self.inbox.get()] if not self.streams else []
      while True:
        try:
          jobs.append(self.inbox.get_nowait())
        except queue.Empty:
          break
      if None in jobs:
        return
      jobs = [j for j in jobs if not j.cancelled]
      for j in (j for j in jobs if j.stream):
        self._open(j)
      groups: dict = {}
      for j in (j for j in jobs if not j.stream):
        groups.setdefault(j.group(), []).append(j)
      for group in groups.values():
        self._decode(group)
      self._advance()

  def _decode(self, jobs: list[Job]) -> None:
    """One generate call for jobs of one group; each job's future gets its Results."""
    first = jobs[0]
    seed = first.seed if first.seed is not None else random.randrange(2**31)
    prompts = [p for j in jobs for p in j.prompts]
    self.generate_calls += 1
    try:
      rows = sample.generate(
          self.ctx.params, self.ctx.mcfg, prompts, lora=self.loras[first.model],
          max_new_tokens=max(j.max_tokens for j in jobs), temperature=first.temperature,
          top_k=first.top_k, top_p=first.top_p, eos_id=self.stop_ids,
          pad_id=self.ctx.tokenizer.pad_token_id or 0, seed=seed, batch=self.batch)
    except Exception as e:  # pylint: disable=broad-except  # the request fails, the server stays
      for j in jobs:
        _resolve(j, exception=e)
      return
    for j in jobs:
      out, rows = rows[:len(j.prompts)], rows[len(j.prompts):]
      _resolve(j, [self._finish(j, p, r[:j.max_tokens]) for p, r in zip(j.prompts, out)])

  def _finish(self, job: Job, prompt: list[int], row: list[int]) -> Result:
    stopped = bool(row) and row[-1] in self.stop_ids
    text = Text(self.ctx.tokenizer, self.tok_lock, job.stop)
    text.add(row[:-1] if stopped else row)
    reason = "stop" if stopped or text.stopped else "length"
    return Result(text.text, reason, len(prompt), len(row))

  def _open(self, job: Job) -> None:
    seed = job.seed if job.seed is not None else random.randrange(2**31)
    spec = sample.SampleSpec(max_new_tokens=job.max_tokens, temperature=job.temperature,
                             top_k=job.top_k, top_p=job.top_p, seed=seed,
                             stop_ids=self.stop_ids, pad_id=self.ctx.tokenizer.pad_token_id or 0)
    tokens = sample.stream(self.ctx.params, self.ctx.mcfg, job.prompts[0],
                           lora=self.loras[job.model], spec=spec)
    # counts: characters sent, tokens generated
    self.streams.append((job, tokens, Text(self.ctx.tokenizer, self.tok_lock, job.stop), [0, 0]))

  def _advance(self) -> None:
    """One token for every open stream; finished or abandoned ones close."""
    still = []
    for job, tokens, text, counts in self.streams:
      try:
        token = None if job.cancelled else next(tokens, None)
      except Exception as e:  # pylint: disable=broad-except
        _emit(job, ("error", e))
        continue
      if token is None:  # max_tokens reached (or the client left)
        self._close(job, tokens, text, counts, "length")
        continue
      counts[1] += 1
      if token not in self.stop_ids:
        text.add([token])
      if token in self.stop_ids or text.stopped:
        self._close(job, tokens, text, counts, "stop")
        continue
      delta = text.safe[counts[0]:]
      if delta:
        counts[0] += len(delta)
        _emit(job, ("text", delta))
      still.append((job, tokens, text, counts))
    self.streams = still

  @staticmethod
  def _close(job: Job, tokens, text: Text, counts: list[int], reason: str) -> None:
    """The rest of the text (what was held back), then the end of the stream."""
    tokens.close()
    if job.cancelled:
      return
    if text.text[counts[0]:]:
      _emit(job, ("text", text.text[counts[0]:]))
    _emit(job, ("end", Result(text.text, reason, len(job.prompts[0]), counts[1])))


def _resolve(job: Job, result=None, exception: Exception | None = None) -> None:
  def set_():
    if job.future.done():  # the request was cancelled meanwhile
      return
    if exception is not None:
      job.future.set_exception(exception)
    else:
      job.future.set_result(result)
  job.loop.call_soon_threadsafe(set_)


def _emit(job: Job, event) -> None:
  job.loop.call_soon_threadsafe(job.events.put_nowait, event)
