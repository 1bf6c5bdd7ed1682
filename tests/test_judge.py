"""The judge: its answer parsing and aggregate by hand, retries and unjudged records against a
stub server that fails, and `run.py eval --judge` end to end against our own serve."""

import http.server
import json
import os
import threading
import time

import pytest
import servers

from jax_it import judge

ROWS = [{"instruction": "Add 2 and 3.", "input": "", "output": "5", "response_base": "6",
         "response_tuned": "5"},
        {"messages": [{"role": "user", "content": "Hi"}], "output": "Hello!",
         "response_base": "Hey", "response_tuned": "Hello!"}]


@pytest.mark.parametrize("text, score", [
    ("85", 85), (" 72.5\n", 72.5), ("**90**.", 90), ("85%", 85), ("Score: 90/100", 90),
    ("8/10", 80), ("Rating: 7 out of 10", 70), ("I would give it a score of 85.", 85),
    ("The answer is 100.", 100), ("<think>maybe 20? no</think>\n64", 64), ("150", None),
    ("excellent", None), ("<think>still thinking 12", None),
    # numbers in passing, as a small judge writes them, are no scores
    ("The boiling point of bromine is 100 degrees Celsius.", None),
    ("1. First Moon Landing", None)])
def test_scores_are_read_from_free_text(text, score):
  assert judge.parse_score(text) == score


@pytest.mark.parametrize("text, choice", [
    ("A", "A"), (" b.", "B"), ("Tie", "tie"), ("**A**", "A"), ("Response B is better.", "B"),
    ("Answer (A) wins", "A"), ("The correct answer is A.", "A"), ("Verdict: **B**", "B"),
    ("It's a tie.", "tie"), ("<think>A or B</think>B", "B"),
    ("Both are fine", None), ("", None)])
def test_pairwise_choices_are_read_from_free_text(text, choice):
  assert judge.parse_choice(text) == choice


def test_aggregate_by_hand():
  rows = [{"judge_score_base": 40, "judge_score_tuned": 80, "judge_pair": "tuned",
           "judge_pair_orders": ["tuned", "tuned"]},
          {"judge_score_base": 60, "judge_score_tuned": None, "judge_pair": "tie",
           "judge_pair_orders": ["base", "tuned"]},  # the orders disagree: a tie
          {"judge_score_base": None, "judge_score_tuned": 70, "judge_pair": "base",
           "judge_pair_orders": ["base", "base"]},
          {"judge_score_base": 50, "judge_score_tuned": 90, "judge_pair": None,
           "judge_pair_orders": [None, "tuned"]}]
  a = judge.aggregate(rows)
  assert a["score_base"]["mean"] == 50 and a["score_base"]["unjudged"] == 1
  # sd 10, n 3: 50 -+ 1.96 * 10 / sqrt(3)
  assert a["score_base"]["ci95"] == pytest.approx([38.684, 61.316], abs=1e-3)
  assert a["score_tuned"]["mean"] == 80 and a["score_tuned"]["n"] == 3
  pw = a["pairwise"]
  assert (pw["n"], pw["wins"], pw["losses"], pw["ties"], pw["unjudged"]) == (3, 1, 1, 1, 1)
  assert pw["win_rate"] == 0.5 and pw["order_disagreements"] == 1
  # Wilson, p = 0.5, n = 3: 0.5 -+ 1.96 * sqrt(0.25 / 3 + 1.96^2 / 36) / (1 + 1.96^2 / 3)
  assert pw["ci95"] == pytest.approx([0.1253, 0.8747], abs=1e-4)  # half-width 0.3747
  assert a["unjudged"] == 3 and a["judgements"] == 12
  assert judge.wilson(0, 0) is None and judge.mean_interval([])["mean"] is None


class _Stub(http.server.BaseHTTPRequestHandler):
  """Answers from a script shared by the test: each POST takes the next (status, reply, delay);
  a str reply is the judge's answer, a dict the JSON body, bytes the body as it is."""

  script: list = []
  seen: list = []

  def do_POST(self):  # noqa: N802
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    _Stub.seen.append(body)
    status, reply, delay = _Stub.script.pop(0) if _Stub.script else (200, "50", 0)
    time.sleep(delay)
    if isinstance(reply, str):  # an answer; bytes go out as they are
      reply = {"choices": [{"message": {"role": "assistant", "content": reply}}]}
    data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
    try:
      self.send_response(status)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    except OSError:  # the client timed out and left
      pass

  def log_message(self, *args):
    pass


@pytest.fixture
def stub():
  _Stub.script, _Stub.seen = [], []
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
  srv.shutdown()
  srv.server_close()


def _judge(url, **kw):
  return judge.Judge(url, "stub", timeout=0.5, retries=2, backoff=0.01, workers=1, **kw)


def test_failures_are_retried_then_unjudged_and_the_run_goes_on(stub):
  _Stub.script = [(500, b"{}", 0), (503, b"oops", 0), (200, "85", 0),  # base score, third try
                  (200, b"not json {", 0), (200, {"choices": []}, 0), (200, "90", 0.8),
                  (200, "A", 0), (200, "B", 0),  # the pair, base then tuned first: agree on base
                  (404, {"error": {"message": "no model stub"}}, 0)]  # not retried
  rows = [dict(r) for r in ROWS]
  result = _judge(stub).evaluate(rows)
  assert rows[0]["judge_score_base"] == 85 and rows[0]["judge_score_tuned"] is None
  assert rows[0]["judge_pair"] == "base" and rows[0]["judge_pair_orders"] == ["base", "base"]
  assert rows[0]["judge_answers"]["score_tuned"].startswith("(unjudged: TimeoutError")
  assert rows[1]["judge_score_base"] is None and rows[1]["judge_score_tuned"] == 50
  assert result["score_tuned"]["unjudged"] == 1 and result["unjudged"] == 3
  reasons = result["unjudged_reasons"]
  assert reasons["HTTP 404: no model stub"] == 1 and "gave_up" not in result
  assert len(_Stub.seen) == 9 + 3 and _Stub.seen[0]["temperature"] == 0


def test_a_judge_that_stays_down_is_given_up_after_some_records(stub):
  _Stub.script = [(502, b"{}", 0)] * 100
  rows = [dict(ROWS[0]) for _ in range(5)]
  result = _judge(stub).evaluate(rows)
  assert result["unjudged"] == 15 and result["pairwise"]["n"] == 0
  assert "failed 3 requests in a row (last: HTTP 502" in result["gave_up"]
  assert len(_Stub.seen) == 3 * 3  # three requests of three tries; the rest never asked


def test_nothing_listening_leaves_every_record_unjudged():
  j = judge.Judge("http://127.0.0.1:9/v1", None, timeout=0.5, retries=0)
  result = j.evaluate([dict(r) for r in ROWS])
  assert result["unjudged"] == 6 and "v1/models could not be read" in result["gave_up"]


def test_the_prompts_are_files_the_user_can_replace(stub, tmp_path):
  mine = tmp_path / "score.txt"
  mine.write_text("Q: {instruction} | ref {reference} | got {response} | {input}. Number?")
  j = _judge(stub, score_prompt=str(mine))
  j.evaluate([dict(ROWS[0])])
  asked = _Stub.seen[0]["messages"][0]["content"]
  assert asked == "Q: Add 2 and 3. | ref 5 | got 6 | (none). Number?"
  assert "Answer A:\n6\n\nAnswer B:\n5" in _Stub.seen[2]["messages"][0]["content"]
  assert "Answer A:\n5\n\nAnswer B:\n6" in _Stub.seen[3]["messages"][0]["content"]
  bad = tmp_path / "bad.txt"
  bad.write_text("no placeholders")
  with pytest.raises(judge.JudgeError, match="lacks {response}"):
    judge.Judge(stub, score_prompt=str(bad))
  with pytest.raises(judge.JudgeError, match="No such file"):
    judge.Judge(stub, pair_prompt=str(tmp_path / "missing.txt"))


def test_eval_judged_by_our_own_serve_end_to_end(tmp_path_factory, tmp_path):
  run_dir, url, _ = servers.shared_server(tmp_path_factory)
  records = tmp_path / "records.jsonl"
  records.write_text("\n".join(json.dumps({"messages": [
      {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
      for q, a in (("What is 2 plus 2?", "4"), ("Name a colour.", "Blue"))))
  out = servers.run_py("eval", "--run-dir", run_dir, "--data", str(records), "--judge", url,
                       "--judge-model", "tuned", "generate.max_new_tokens=4")
  assert "| judge: tuned at http://127.0.0.1:" in out.stdout, out.stdout
  metrics = json.load(open(os.path.join(run_dir, "eval_metrics.json")))
  j = metrics["judge"]
  assert j["model"] == "tuned" and j["records"] == 2
  assert "{response}" in j["prompts"]["score"]["text"] and "answer alone" in j["parsing"]
  assert j["prompts"]["pair"]["source"] == "packaged judge_pair.txt"
  # a random tiny model judges: its answers are real replies, rarely numbers; what it did not
  # judge is counted with the reason
  judged = j["score_base"]["n"] + j["score_tuned"]["n"] + j["pairwise"]["n"]
  assert judged + j["unjudged"] == 6 and j["judgements"] == 6
  assert all(not k.startswith(("HTTP", "not asked")) for k in j["unjudged_reasons"])
  rows = json.load(open(os.path.join(run_dir, "eval.json")))
  answers = rows[0]["judge_answers"]
  assert set(answers) == {"score_base", "score_tuned", "pair_base_first", "pair_tuned_first"}
  assert not any(a.startswith("(unjudged") for a in answers.values())
  report = open(os.path.join(run_dir, "report.md")).read()
  assert "tuned win rate, a tie counting half (95% Wilson interval)" in report
  assert "## Judge prompt: score (packaged judge_score.txt)" in report
