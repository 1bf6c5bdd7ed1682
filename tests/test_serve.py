"""run.py serve through the official openai client: a real server process on localhost with a
tiny trained run (Gemma's chat format). Chat and completions, streamed and not, base and tuned;
batched answers equal lone ones; stop strings; bad requests get OpenAI error bodies and the
server keeps serving; a busy port is a one-line error."""

import concurrent.futures
import json
import socket
import types
import urllib.error
import urllib.request

import pytest
import servers

openai = pytest.importorskip("openai")

HI = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  run_dir, url, log = servers.shared_server(tmp_path_factory)
  client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
  return types.SimpleNamespace(run_dir=run_dir, url=url, log=log, client=client)


def _streamed(chunks) -> tuple[str, str, list]:
  text, reason, usage = "", None, []
  for c in chunks:
    if c.usage:
      usage.append(c.usage)
    for ch in c.choices:
      text += (ch.delta.content or "") if hasattr(ch, "delta") else ch.text
      reason = ch.finish_reason or reason
  return text, reason, usage


def test_models_and_chat_streamed_or_not_base_and_tuned(server):
  c = server.client
  names = [m.id for m in c.models.list()]
  assert names[:2] == ["base", "tuned"] and len(names) == 3  # and the run's name
  for model in ("base", "tuned", names[2]):
    r = c.chat.completions.create(model=model, messages=HI, max_tokens=6)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == model
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = c.chat.completions.create(model=model, messages=HI, max_tokens=6, stream=True,
                                       stream_options={"include_usage": True})
    text, reason, usage = _streamed(stream)
    # greedy: the stream is the same reply, token for token
    assert (text, reason) == (choice.message.content, choice.finish_reason)
    assert usage and usage[0].completion_tokens == r.usage.completion_tokens


def test_completions_take_prompt_lists_and_stream(server):
  c = server.client
  r = c.completions.create(model="tuned", prompt=["Once upon", "The capital of"], max_tokens=5)
  assert [ch.index for ch in r.choices] == [0, 1] and r.object == "text_completion"
  assert all(ch.finish_reason in ("stop", "length") for ch in r.choices)
  text, reason, _ = _streamed(c.completions.create(model="tuned", prompt="The capital of",
                                                   max_tokens=5, stream=True))
  assert (text, reason) == (r.choices[1].text, r.choices[1].finish_reason)


def test_concurrent_requests_are_batched_and_answer_as_alone(server):
  """Requests that arrive together share generate calls, each cut at its own max_tokens, and
  get the replies they get alone (greedy tokens do not depend on what shares the batch)."""
  c = server.client
  asks = [("base", "Name a colour", 3), ("tuned", "Name a colour", 7), ("tuned", "Count", 2),
          ("tuned", "Say hi", 7), ("base", "Count", 5), ("tuned", "Name a colour", 3)]

  def ask(a):
    r = c.chat.completions.create(model=a[0], messages=[{"role": "user", "content": a[1]}],
                                  max_tokens=a[2])
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

  alone = [ask(a) for a in asks]
  before = _health(server)["generate_calls"]
  with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
    together = list(pool.map(ask, asks))
  calls = _health(server)["generate_calls"] - before
  assert together == alone
  assert calls < len(asks) - 1, calls  # base and tuned batch apart
  assert all(n <= a[2] for (_, _, n), a in zip(alone, asks))


def test_stop_strings_cut_the_reply(server):
  c = server.client
  full = c.chat.completions.create(model="tuned", messages=HI, max_tokens=8)
  text = full.choices[0].message.content
  cut = next(i for i in range(2, len(text)) if not text[i].isspace())
  stop = text[cut:cut + 2]
  first = text.find(stop)
  r = c.chat.completions.create(model="tuned", messages=HI, max_tokens=8, stop=[stop, "zzqx"])
  assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text[:first], "stop")
  streamed = _streamed(c.chat.completions.create(model="tuned", messages=HI, max_tokens=8,
                                                 stop=stop, stream=True))
  assert streamed[:2] == (text[:first], "stop")


def _health(server) -> dict:
  with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=30) as r:
    return json.loads(r.read())


def _raw(server, path: str, body: bytes) -> tuple[int, dict]:
  req = urllib.request.Request(server.url.removesuffix("/v1") + path, data=body,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.mark.parametrize("change, status, says", [
    ({"model": "gpt-4"}, 404, "The model 'gpt-4' does not exist"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     400, "the last message must have role 'user'"),
    ({"max_tokens": 5000}, 400, "more than this server allows (1024)"),
    ({"max_tokens": -1}, 400, "max_tokens: Input should be greater than or equal to 1"),
    ({"n": 2}, 400, "n is not supported"),
    ({"logprobs": True}, 400, "logprobs is not supported"),
    ({"temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "this server takes at most"),
])
def test_bad_requests_get_openai_errors(server, change, status, says):
  body = {"model": "tuned", "messages": HI, "max_tokens": 2, **change}
  code, err = _raw(server, "/v1/chat/completions", json.dumps(body).encode())
  assert code == status and says in err["error"]["message"], err
  assert set(err["error"]) == {"message", "type", "param", "code"}


def test_the_server_keeps_serving_after_bad_input(server):
  code, err = _raw(server, "/v1/chat/completions", b'{"model": "tuned", "messages": [')
  assert code == 400 and "not valid JSON" in err["error"]["message"]
  assert _raw(server, "/v1/nothing", b"{}")[0] == 404
  with pytest.raises(openai.BadRequestError) as e:  # the official client reads our errors
    server.client.completions.create(model="base", prompt="x", max_tokens=2, echo=True)
  assert e.value.body["param"] == "echo"
  r = server.client.chat.completions.create(model="tuned", messages=HI, max_tokens=2)
  assert r.choices[0].finish_reason in ("stop", "length") and servers.server_alive()


def test_a_busy_port_is_a_one_line_error(server):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    out = servers.run_py("serve", "--run-dir", server.run_dir, "--port", str(port), check=False)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert f"error: port {port} on 127.0.0.1 is in use" in out.stderr


def test_alpaca_runs_take_the_last_user_message_as_the_instruction():
  from jax_it import data
  from jax_it.run import serve, serve_schema
  ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(data=data.DataConfig(template="alpaca")))
  s = serve.Server(ctx, None, serve.Limits(), "run")
  m = serve_schema.Message
  msgs = [m(role="system", content="Be terse."), m(role="user", content="old"),
          m(role="assistant", content="a"),
          m(role="user", content=[serve_schema.Part(type="text", text="Add 2 and 3")])]
  assert s.chat_prompt(msgs).endswith("### Instruction:\nAdd 2 and 3\n\n### Response:")
  assert "old" not in s.chat_prompt(msgs)


def test_streamed_text_holds_back_what_may_become_a_stop_string():
  import threading

  from jax_it.run.serve_engine import Text
  tok = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(map(chr, ids)))
  t = Text(tok, threading.Lock(), ("END",))
  t.add([ord(ch) for ch in "abcE"])
  assert (t.safe, t.stopped) == ("abc", False)  # "E" may start "END"
  t.add([ord("N")])
  assert t.safe == "abc"
  t.add([ord("x")])
  assert (t.safe, t.stopped) == ("abcENx", False)
  t.add([ord(ch) for ch in "yEND!"])
  assert (t.text, t.safe, t.stopped) == ("abcENxy", "abcENxy", True)
