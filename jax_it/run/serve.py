"""`run.py serve`: the run's base and tuned model behind an OpenAI-compatible HTTP API.

  GET  /v1/models             base, tuned (and the run's name, an alias of tuned)
  POST /v1/chat/completions   messages in the run's template: Gemma's turn format for
                              data.template=gemma; for Alpaca-style runs the last user message is
                              the instruction and earlier turns are dropped (that format has none)
  POST /v1/completions        the prompt as given (BOS prepended, no template)

Both take `stream` (server-sent events) and stop at the run's stop tokens. Sampling fields left
out come from the run's generate section (greedy by default). Fields the model cannot honour
(n > 1, logprobs, tools, penalties, ...) are refused with a 400, unknown ones ignored. Errors
have OpenAI's body: {"error": {"message", "type", "param", "code"}}. The decoding is in
serve_engine (one worker thread; requests queued and batched).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import socket
import time
import uuid

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jax_it import data, sample, templates
from jax_it.run.serve_engine import Engine, Job, Result
from jax_it.run.serve_schema import ChatBody, CompletionBody, Message, RequestBody
from jax_it.run.setup import Context, RunError


@dataclasses.dataclass(frozen=True)
class Limits:
  max_tokens: int = 1024  # the most new tokens one request may ask for
  max_prompt_tokens: int = 4096
  max_pending: int = 64  # requests queued or streaming; more get a 429


class ApiError(Exception):
  """A request the server refuses: answered with `status` and OpenAI's error body."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param=None, code=None) -> JSONResponse:
  kind = "invalid_request_error" if status < 500 else "server_error"
  return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                 "code": code}}, status_code=status)


# ---------------------------------------------------------------------------------------------
# The app


class Server:
  """What the routes share: the loaded run, its template, the engine, the limits."""

  def __init__(self, ctx: Context, engine: Engine, limits: Limits, name: str):
    self.ctx, self.engine, self.limits = ctx, engine, limits
    self.template = data.template_of(ctx.cfg.data)
    self.models = {"base": "base", "tuned": "tuned", name: "tuned"}

  def model(self, name: str) -> str:
    if name not in self.models:
      raise ApiError(404, f"The model {name!r} does not exist; this server has "
                     f"{', '.join(self.models)}", "model", "model_not_found")
    return self.models[name]

  def chat_prompt(self, messages: list[Message]) -> str:
    turns = []
    for m in messages:
      content = m.content if isinstance(m.content, str) else "".join(
          p.text for p in m.content or [])
      turns.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if turns[-1]["role"] != "user":
      raise ApiError(400, "the last message must have role 'user'", "messages")
    if any(t["role"] == "system" for t in turns[1:]):
      raise ApiError(400, "a system message may only come first", "messages")
    if isinstance(self.template, templates.ChatTemplate):
      return self.template.generation_prompt(turns)
    record = {"instruction": turns[-1]["content"], "input": "", "output": ""}
    return templates.format_prompt(record, self.template)[0]

  def job(self, body: RequestBody, prompts: list[str], max_tokens: int | None) -> Job:
    """Validated settings and tokenized prompts, ready for the engine."""
    what = body.unsupported()
    if what:
      raise ApiError(400, f"{what} is not supported by this server", what, "unsupported_parameter")
    model = self.model(body.model)
    g, lim = self.ctx.cfg.generate, self.limits
    n = max_tokens or min(g.max_new_tokens or 16, lim.max_tokens)
    if n > lim.max_tokens:
      raise ApiError(400, f"max_tokens={n} is more than this server allows ({lim.max_tokens})",
                     "max_tokens")
    with self.engine.tok_lock:
      ids = [sample.prompt_ids(self.ctx.tokenizer, p) for p in prompts]
    longest = max(len(p) for p in ids)
    if longest > lim.max_prompt_tokens:
      raise ApiError(400, f"the prompt has {longest} tokens; this server takes at most "
                     f"{lim.max_prompt_tokens}", "messages", "context_length_exceeded")
    if self.engine.pending() >= lim.max_pending:
      raise ApiError(429, f"{lim.max_pending} requests are waiting; try again later",
                     code="rate_limit_exceeded")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or not all(stop):
      raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
    pick = lambda v, d: d if v is None else v
    return Job(model, ids, n, pick(body.temperature, g.temperature), pick(body.top_p, g.top_p),
               pick(body.top_k, g.top_k), body.seed, stop, body.stream,
               asyncio.get_running_loop(), stream_options=body.stream_options)


def _usage(results: list[Result]) -> dict:
  p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
  return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj) -> str:
  return f"data: {json.dumps(obj)}\n\n"


async def _events(job: Job, head: dict, chat: bool):
  """The SSE body of a streaming request: deltas, the finish reason, usage if asked, [DONE]."""
  def chunk(delta: str | None, reason=None, role=False):
    if chat:
      d = ({"role": "assistant"} if role else {}) | ({} if delta is None else {"content": delta})
      choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
    else:
      choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
    return _sse({**head, "choices": [choice]})

  try:
    if chat:
      yield chunk("", role=True)
    while True:
      kind, value = await job.events.get()
      if kind == "text":
        yield chunk(value)
      elif kind == "error":
        yield _sse({"error": {"message": f"{type(value).__name__}: {value}",
                              "type": "server_error", "param": None, "code": None}})
        return
      else:
        yield chunk(None, value.finish_reason)
        if (job.stream_options or {}).get("include_usage"):
          yield _sse({**head, "choices": [], "usage": _usage([value])})
        yield "data: [DONE]\n\n"
        return
  finally:
    job.cancelled = True  # also when the client disconnects: the worker drops the stream


def app(server: Server) -> FastAPI:
  api = FastAPI(title="jax_it serve", docs_url=None, redoc_url=None)

  @api.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return _error(e.status, e.message, e.param, e.code)

  @api.exception_handler(RequestValidationError)
  async def invalid(_, e: RequestValidationError):
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
      return _error(400, f"the request body is not valid JSON ({err.get('msg')})")
    where = ".".join(str(x) for x in err.get("loc", ())[1:])
    return _error(400, f"{where}: {err.get('msg')}", where or None)

  @api.exception_handler(HTTPException)
  async def http_error(_, e: HTTPException):
    return _error(e.status_code, str(e.detail))

  @api.exception_handler(Exception)
  async def failed(_, e: Exception):
    return _error(500, f"{type(e).__name__}: {e}")

  @api.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                        "owned_by": "jax_it"} for m in server.models]}

  @api.get("/health")
  async def health():
    return {"status": "ok", "pending": server.engine.pending(),
            "generate_calls": server.engine.generate_calls}

  async def respond(body: RequestBody, job: Job, kind: str):
    head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": body.model}
    server.engine.submit(job)
    if body.stream:
      head["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"
      return StreamingResponse(_events(job, head, kind == "chat"),
                               media_type="text/event-stream")
    try:
      results = await job.future
    finally:
      job.cancelled = True
    if kind == "chat":
      choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                  "finish_reason": r.finish_reason, "logprobs": None}
                 for i, r in enumerate(results)]
    else:
      choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                  "logprobs": None} for i, r in enumerate(results)]
    return {**head, "choices": choices, "usage": _usage(results)}

  @api.post("/v1/chat/completions")
  async def chat(body: ChatBody):
    prompt = server.chat_prompt(body.messages)
    job = server.job(body, [prompt], body.max_completion_tokens or body.max_tokens)
    return await respond(body, job, "chat")

  @api.post("/v1/completions")
  async def completions(body: CompletionBody):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if body.stream and len(prompts) > 1:
      raise ApiError(400, "stream takes one prompt", "prompt")
    return await respond(body, server.job(body, prompts, body.max_tokens), "completion")

  return api


# ---------------------------------------------------------------------------------------------
# Starting


def bind(host: str, port: int) -> socket.socket:
  """The listening socket, taken before the model loads: a busy port fails in a second."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    if e.errno == errno.EADDRINUSE:
      raise RunError(f"port {port} on {host} is in use; give another with --port") from None
    raise RunError(f"cannot listen on {host}:{port}: {e.strerror}") from None
  sock.listen(128)
  return sock


def serve(ctx: Context, adapter, sock: socket.socket, limits: Limits = Limits()) -> int:
  """Serves until interrupted (Ctrl-C, SIGTERM)."""
  import uvicorn
  stops = templates.stop_ids(data.template_of(ctx.cfg.data), ctx.tokenizer)
  engine = Engine(ctx, adapter, stops, limits.max_pending).start()
  name = os.path.basename(os.path.normpath(ctx.run_dir))
  server = Server(ctx, engine, limits, name)
  host, port = sock.getsockname()[:2]
  print(f"serving {', '.join(server.models)} of {ctx.run_dir} (template {server.template.name}) "
        f"on http://{host}:{port}/v1", flush=True)
  config = uvicorn.Config(app(server), log_level="info", timeout_graceful_shutdown=2)
  uvicorn.Server(config).run(sockets=[sock])
  engine.stop()
  return 0
