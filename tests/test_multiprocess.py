"""`run.py` as several processes over loopback (gloo), the way a pod or a cluster starts it.

The whole command, not only the step: 2 processes x 2 CPU devices train (killed and resumed on
the way) to the losses and LoRA weights of 1 process x 4 devices and of 1 process x 1 device;
`eval` and `export` as 2 processes write what 1 process writes; a process that fails stops the
others at once; processes started differently are refused.
"""

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# 8 rows x 2 micro-batches: divides over 1, 4 and 2 x 2 devices; 8 steps, a checkpoint every 2;
# the base-vs-tuned report only where a test reads it (generation compiles for a while)
TRAIN = ["--config", TINY, "--no-progress", "train.batch_size=8", "train.micro_batches=2",
         "train.max_steps=8", "checkpoint.every=2", "checkpoint.keep=4", "train.eval_every=4",
         "report.eval_samples=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(args, processes=1, devices=1, env=None, cwds=None):
  """`run.py args` as `processes` processes of `devices` CPU devices each (process i working
  in cwds[i], default the checkout); the Popens."""
  port = _free_port()
  procs = []
  for i, cwd in enumerate(cwds or [ROOT] * processes):
    e = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), **(env or {}))
    if processes > 1:
      e.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    procs.append(subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=e,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def finish(procs, ok=True, timeout=600):
  outs = [p.communicate(timeout=timeout) for p in procs]
  if ok:
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
      assert p.returncode == 0, f"process {i}: {err[-3000:]}"
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def losses(run_dir: Path) -> dict[int, float]:
  with open(run_dir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == sorted(set(steps)), steps  # one writer, resumed log read as one run
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter(out_dir: Path) -> dict[str, np.ndarray]:
  return load_file(str(out_dir / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Three trainings of one config: 1 x 1, 1 x 4, and 2 x 2 devices; the last is SIGKILLed
  twice at random steps (one process, then all) and resumed each time with the same command."""
  root = tmp_path_factory.mktemp("multi")
  dirs = {name: root / name for name in ("1x1", "1x4", "2x2")}
  finish(start(TRAIN + ["--run-dir", str(dirs["1x1"])]))
  finish(start(TRAIN + ["--run-dir", str(dirs["1x4"])], devices=4))
  rng = random.Random()
  one, every = rng.randint(2, 4), rng.randint(5, 7)  # step 2 and 4: before their checkpoint
  # the same command each time; the report (made only by the start that finishes) is read below
  cmd = TRAIN + ["--run-dir", str(dirs["2x2"]), "report.eval_samples=2"]
  t0 = time.monotonic()
  # process 1 dies at step `one`; process 0, waiting on it in a collective, is ended by the
  # coordination service once the heartbeats stop (3 s here), not left hanging
  killed_one = finish(start(cmd, 2, 2, env={"JAX_IT_KILL_AT_STEP": f"{one}@1",
                                            "JAX_IT_HEARTBEAT_TIMEOUT": "3"}), ok=False)
  killed_all = finish(start(cmd, 2, 2, env={"JAX_IT_KILL_AT_STEP": str(every)}), ok=False)
  resumed = finish(start(cmd, 2, 2))
  return {"dirs": dirs, "steps": (one, every), "killed_one": killed_one,
          "killed_all": killed_all, "resumed": resumed, "seconds": time.monotonic() - t0}


def test_two_processes_killed_and_resumed_train_as_one_process(runs):
  one, every = runs["steps"]
  rc = [r[0] for r in runs["killed_one"]]
  assert rc[1] == -9 and rc[0] != 0, (runs["steps"], runs["killed_one"][0][2][-2000:])
  assert [r[0] for r in runs["killed_all"]] == [-9, -9], runs["steps"]
  out0, out1 = runs["resumed"][0][1], runs["resumed"][1][1]
  assert "resuming from the step-" in out0
  assert "| response-token loss |" in out0 and "| response-token loss |" not in out1
  assert "memory per device (4 x cpu):" in out0 and "memory per device" not in out1  # the plan
  d = runs["dirs"]
  ref = losses(d["1x1"])
  assert sorted(ref) == list(range(1, 9))
  for name in ("1x4", "2x2"):
    got = losses(d[name])
    assert sorted(got) == sorted(ref), name
    worst = max(abs(got[s] - ref[s]) for s in ref)
    assert worst <= 1e-5, (name, runs["steps"], got, ref)
  assert sorted(int(p.name) for p in (d["2x2"] / "checkpoints").iterdir()) == [2, 4, 6, 8]
  assert not (d["2x2"] / "train.lock").exists()


def test_eval_and_export_as_two_processes_write_what_one_writes(runs, tmp_path):
  d = runs["dirs"]
  outs = {}
  for name, (n, devices) in {"one": (1, 1), "two": (2, 2)}.items():
    finish(start(["eval", "--run-dir", str(d["2x2"]), "report.eval_samples=2"], n, devices))
    saved = tmp_path / name
    saved.mkdir()
    for f in ("eval.json", "report.md"):
      (saved / f).write_bytes((d["2x2"] / f).read_bytes())
    export = tmp_path / f"export_{name}"
    finish(start(["export", "--run-dir", str(d["2x2"]), "--out", str(export)], n, devices))
    outs[name] = (saved, export)
  (one, ex1), (two, ex2) = outs["one"], outs["two"]
  assert (one / "eval.json").read_text() == (two / "eval.json").read_text()
  assert sorted(p.name for p in ex1.iterdir()) == sorted(p.name for p in ex2.iterdir())
  for f in ex1.iterdir():
    assert f.read_bytes() == (ex2 / f.name).read_bytes(), f.name
  # the final LoRA weights of every layout, exported: within 1e-5 of one process, one device
  finish(start(["export", "--run-dir", str(d["1x1"]), "--out", str(tmp_path / "ref")]))
  finish(start(["export", "--run-dir", str(d["1x4"]), "--out", str(tmp_path / "x4")]))
  ref = adapter(tmp_path / "ref")
  for other in (adapter(tmp_path / "x4"), adapter(ex2)):
    assert sorted(other) == sorted(ref)
    assert max(float(np.abs(other[k] - ref[k]).max()) for k in ref) <= 1e-5


def test_a_failing_process_stops_every_process_at_once(tmp_path):
  """Bad data on one host: each process reads data.json from its own working directory."""
  good, bad = tmp_path / "host0", tmp_path / "host1"
  for d in (good, bad):
    d.mkdir()
  rec = {"instruction": "add 2 and 3", "input": "", "output": "5"}
  (good / "data.json").write_text(json.dumps([rec] * 40))
  (bad / "data.json").write_text(json.dumps([rec] * 3 + [{"instruction": "x"}] + [rec] * 36))
  args = TRAIN + ["--run-dir", str(tmp_path / "run"), "data.path=data.json"]
  procs = start(args, 2, 2, cwds=[good, bad])
  ended = {}
  while len(ended) < 2:
    for i, p in enumerate(procs):
      if i not in ended and p.poll() is not None:
        ended[i] = time.monotonic()
    time.sleep(0.1)
  (rc0, _, err0), (rc1, _, err1) = finish(procs, ok=False)
  assert rc1 == 2 and rc0 == 2, (err0[-2000:], err1[-2000:])
  assert abs(ended[0] - ended[1]) <= 30
  assert "error: data.json: record 3" in err1
  assert "process 1 of 2 failed: error: data.json: record 3" in err0
  for err in (err0, err1):
    assert "Traceback" not in err and "Check failed" not in err and "*** " not in err
  assert not (tmp_path / "run").exists()  # the failed start left no run directory behind


def test_processes_started_with_different_configs_are_refused():
  args = TRAIN + ["--run-dir", "/nonexistent/never-written"]
  port = _free_port()
  procs = []
  for i, lr in enumerate(("1e-3", "2e-3")):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    procs.append(subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, f"train.lr={lr}"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  for rc, _, err in finish(procs, ok=False, timeout=300):
    assert rc == 2, err[-2000:]
    assert "the processes were started with different commands or configs (train.lr: " in err
    assert "Traceback" not in err


def test_process_id_out_of_range_is_one_line():
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID="2")
  out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", TINY], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == ("error: JAX_PROCESS_ID=2 with JAX_NUM_PROCESSES=2: expected "
                                "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES")


def test_unreachable_coordinator_or_busy_port_is_one_line():
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID="1", JAX_IT_JOIN_TIMEOUT="3")
  out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", TINY], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == (
      f"error: could not join the run at JAX_COORDINATOR_ADDRESS={address} (process 1 of 2) "
      "within JAX_IT_JOIN_TIMEOUT=3 s: nothing answers there (Connection refused); start "
      "process 0 first or check the address")
  with socket.socket() as busy:  # process 0 would serve on a port something else holds
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    address = f"127.0.0.1:{busy.getsockname()[1]}"
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", TINY], cwd=ROOT,
                         env=dict(env, JAX_COORDINATOR_ADDRESS=address, JAX_PROCESS_ID="0"),
                         capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().startswith(f"error: JAX_COORDINATOR_ADDRESS={address}: process 0 "
                                       "serves the run on port"), out.stderr[-2000:]
