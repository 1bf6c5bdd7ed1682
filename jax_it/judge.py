"""A model as judge: any OpenAI-compatible chat endpoint (Ollama, vLLM, llama.cpp's server, our
own `run.py serve`) scores base and tuned responses 0-100 against the reference, and picks the
better of the two with their positions swapped.

The score prompt asks for the integer alone, as the reference run's judge did; a pairwise
verdict counts for a model only when both orders name it (else it is a tie), which cancels the
judge's preference for a position. A request that times out, fails (5xx, 429, no connection) or
answers with no usable JSON is retried with exponential backoff, then its record is unjudged;
after `give_up_after` such records in a row the judge is taken for down and the rest are
unjudged at once. The prompts are files: pass others with the same {placeholders}.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
PLACEHOLDERS = {"score": ("{response}",), "pair": ("{response_a}", "{response_b}")}
PARSING = ("reasoning in <think> tags dropped; score: the answer alone if it is a number, else "
           "the first number after 'score', 'rating', 'grade' or 'answer', else the first "
           "fraction; '8/10' and '80 out of 100' rescaled; outside 0-100 unjudged; pair: the "
           "answer alone (A, B or tie), else the first 'answer/response/choice/verdict (is) "
           "A|B', else the word tie; anything else is unjudged")


class JudgeError(ValueError):
  """A judge that cannot be set up (a missing or unfit prompt file, an empty model list)."""


def _read_prompt(path: str | None, kind: str) -> tuple[str, str]:
  """(the prompt template, where it came from)."""
  source = path or os.path.join(PROMPTS, f"judge_{kind}.txt")
  try:
    with open(source, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise JudgeError(f"judge {kind} prompt {source}: {e.strerror}") from None
  missing = [p for p in PLACEHOLDERS[kind] if p not in text]
  if missing:
    raise JudgeError(f"judge {kind} prompt {source}: lacks {', '.join(missing)}")
  return text, ("packaged " + os.path.basename(source)) if not path else source


def fill(template: str, **values: str) -> str:
  """The template with its {placeholders} replaced (str.replace: texts may hold braces)."""
  for k, v in values.items():
    template = template.replace("{" + k + "}", v)
  return template


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_NUM = r"(\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d+))?"
# strictest first: the answer alone; a number after "score", "rating", "grade" or "answer";
# a fraction anywhere. A number in passing ("boils at 100 degrees", "1. First") is no score.
_SCORES = (re.compile(r"^\W*" + _NUM + r"\s*(?:%|points?)?\W*$", re.I),
           re.compile(r"\b(?:score|rating|grade|answer)\b\D{0,20}?" + _NUM, re.I),
           re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*(\d+)", re.I))


def parse_score(text: str) -> float | None:
  text = _THINK.sub("", text)
  for pattern in _SCORES:
    m = pattern.search(text)
    if m:
      value = float(m.group(1))
      if m.group(2) and float(m.group(2)) > 0:
        value = value / float(m.group(2)) * 100
      return value if 0 <= value <= 100 else None
  return None


def parse_choice(text: str) -> str | None:
  """"A", "B", "tie" or None."""
  t = _THINK.sub("", text).strip().upper()
  alone = re.fullmatch(r"\W*(A|B|TIE)\W*", t)
  named = re.search(r"\b(?:ANSWER|RESPONSE|ASSISTANT|CHOICE|VERDICT)(?:\s*(?:IS|:))?\s*[(\[*]*"
                    r"(A|B)\b", t)
  if alone or named:
    return (alone or named).group(1).replace("TIE", "tie")
  return "tie" if re.search(r"\bTIE\b", t) else None


# ---------------------------------------------------------------------------------------------
# Asking


class Judge:
  def __init__(self, url: str, model: str | None = None, *, score_prompt: str | None = None,
               pair_prompt: str | None = None, timeout: float = 120.0, retries: int = 3,
               backoff: float = 1.0, give_up_after: int = 3, workers: int = 4,
               max_tokens: int = 64):
    self.url = re.sub(r"(/v1)?/*$", "", url.strip())
    if not re.match(r"https?://", self.url):
      raise JudgeError(f"--judge {url!r}: expected an http(s):// URL")
    self.model = model
    self.score_prompt, self.score_source = _read_prompt(score_prompt, "score")
    self.pair_prompt, self.pair_source = _read_prompt(pair_prompt, "pair")
    self.timeout, self.retries, self.backoff = timeout, retries, backoff
    self.give_up_after, self.workers, self.max_tokens = give_up_after, workers, max_tokens
    self._lock, self._failed_in_a_row, self.down = threading.Lock(), 0, None

  def _call(self, path: str, body: dict | None) -> dict:
    req = urllib.request.Request(self.url + path, method="POST" if body else "GET",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=self.timeout) as r:
      return json.loads(r.read())

  def resolve_model(self) -> str | None:
    """--judge-model, else the first model the server lists (None and `down` if it can't)."""
    if not self.model:
      try:
        self.model = self._call("/v1/models", None)["data"][0]["id"]
      except Exception as e:  # pylint: disable=broad-except  # unreachable: unjudged, run goes on
        self.down = (f"no --judge-model given and {self.url}/v1/models could not be read "
                     f"({type(e).__name__}: {e})")[:300]
    return self.model

  def ask(self, prompt: str) -> tuple[str | None, str | None]:
    """(the judge's answer, None) or (None, why not), after the retries."""
    if self.down:
      return None, f"not asked: {self.down}"
    body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": self.max_tokens, "stream": False}
    why = ""
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff * 2 ** (attempt - 1))
      try:
        text = self._call("/v1/chat/completions", body)["choices"][0]["message"]["content"]
        if not isinstance(text, str):
          raise ValueError("no text in choices[0].message.content")
        self._count(ok=True)
        return text, None
      except urllib.error.HTTPError as e:
        why = f"HTTP {e.code}: {_error_text(e)}"
        if e.code < 500 and e.code != 429:  # the request itself is wrong: asking again won't do
          return None, why
      except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        why = f"{type(e).__name__}: {e}"[:300]  # timeouts, refused connections, bad JSON
    self._count(ok=False, why=why)
    return None, f"{why} (after {self.retries + 1} tries)"

  def _count(self, ok: bool, why: str = "") -> None:
    with self._lock:
      self._failed_in_a_row = 0 if ok else self._failed_in_a_row + 1
      if self._failed_in_a_row >= self.give_up_after and not self.down:
        self.down = f"the judge failed {self._failed_in_a_row} requests in a row (last: {why})"

  # -- records ------------------------------------------------------------------------------

  def _judge_row(self, row: dict) -> dict:
    """The row's judge_* keys: both scores, both orders of the pair, and the raw answers."""
    fields = _fields(row)
    out, answers = {}, {}
    for name in ("base", "tuned"):
      text, why = self.ask(fill(self.score_prompt, **fields, response=row[f"response_{name}"]))
      score = None if text is None else parse_score(text)
      answers[f"score_{name}"] = text if text is not None else f"(unjudged: {why})"
      out[f"judge_score_{name}"] = score
      if text is not None and score is None:
        why = "no score 0-100 in the answer"
      out[f"_why_{name}"] = why
    picks = []
    for first, second in (("base", "tuned"), ("tuned", "base")):
      text, why = self.ask(fill(self.pair_prompt, **fields, response_a=row[f"response_{first}"],
                                response_b=row[f"response_{second}"]))
      answers[f"pair_{first}_first"] = text if text is not None else f"(unjudged: {why})"
      choice = None if text is None else parse_choice(text)
      picks.append({"A": first, "B": second, "tie": "tie"}.get(choice))
      if text is not None and choice is None:
        why = "no A, B or tie in the answer"
      out["_why_pair"] = out.get("_why_pair") or why
    out["judge_pair"] = None if None in picks else picks[0] if picks[0] == picks[1] else "tie"
    out["judge_pair_orders"] = picks
    out["judge_answers"] = answers
    return out

  def evaluate(self, rows: list[dict]) -> dict:
    """Judges every row (adding its judge_* keys) and returns the aggregate for the report."""
    self.resolve_model()
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      judged = list(pool.map(self._judge_row, rows))
    why = collections.Counter()
    for row, j in zip(rows, judged):
      for k in ("_why_base", "_why_tuned", "_why_pair"):
        reason = j.pop(k)
        if reason:
          why[reason.split(" (after")[0][:160]] += 1
      row.update(j)
    result = {"url": self.url, "model": self.model,
              "prompts": {"score": {"source": self.score_source, "text": self.score_prompt},
                          "pair": {"source": self.pair_source, "text": self.pair_prompt}},
              "parsing": PARSING, "settings": {"temperature": 0, "max_tokens": self.max_tokens,
                                               "timeout_s": self.timeout,
                                               "retries": self.retries},
              **aggregate(rows)}
    result["unjudged_reasons"] = dict(why.most_common(5))
    if self.down:
      result["gave_up"] = self.down
    return result


def _fields(row: dict) -> dict:
  if "messages" in row:
    instruction = "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    given = ""
  else:
    instruction, given = row["instruction"], row.get("input", "")
  return {"instruction": instruction, "input": given or "(none)",
          "reference": row.get("output") or "(none given)"}


def _error_text(e: urllib.error.HTTPError) -> str:
  try:
    body = json.loads(e.read())
    return str(body.get("error", {}).get("message") or body)[:200]
  except Exception:  # pylint: disable=broad-except
    return str(e.reason)[:200]


# ---------------------------------------------------------------------------------------------
# The aggregate


def mean_interval(values: list[float]) -> dict:
  """Mean and its 95% interval (normal approximation, sample standard deviation)."""
  n = len(values)
  if not n:
    return {"n": 0, "mean": None, "ci95": None}
  mean = sum(values) / n
  if n < 2:
    return {"n": n, "mean": mean, "ci95": None}
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  half = 1.96 * sd / math.sqrt(n)
  return {"n": n, "mean": mean, "ci95": [max(0.0, mean - half), min(100.0, mean + half)]}


def wilson(successes: float, n: int, z: float = 1.96) -> list[float] | None:
  """The Wilson score interval of a proportion (95% by default)."""
  if not n:
    return None
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return [max(0.0, centre - half), min(1.0, centre + half)]


def aggregate(rows: list[dict]) -> dict:
  """Mean scores per model; the pairwise tally of tuned against base, its win rate (a tie
  counts half) with a Wilson interval; how many were unjudged."""
  out = {}
  for name in ("base", "tuned"):
    scores = [r[f"judge_score_{name}"] for r in rows if r.get(f"judge_score_{name}") is not None]
    out[f"score_{name}"] = {**mean_interval(scores), "unjudged": len(rows) - len(scores)}
  picks = [r.get("judge_pair") for r in rows]
  judged = [p for p in picks if p is not None]
  wins, losses, ties = (judged.count(k) for k in ("tuned", "base", "tie"))
  # the two orders named different models: the judge followed the position, not the answer
  flips = sum(1 for r in rows if r.get("judge_pair_orders") and None not in r["judge_pair_orders"]
              and "tie" not in r["judge_pair_orders"] and len(set(r["judge_pair_orders"])) == 2)
  n = len(judged)
  out["pairwise"] = {"n": n, "wins": wins, "losses": losses, "ties": ties,
                     "order_disagreements": flips,
                     "win_rate": (wins + ties / 2) / n if n else None,
                     "ci95": wilson(wins + ties / 2, n), "unjudged": len(picks) - n}
  out["records"], out["judgements"] = len(rows), 3 * len(rows)
  out["unjudged"] = sum(out[k]["unjudged"] for k in ("score_base", "score_tuned", "pairwise"))
  return out
