"""`run.py train` as two processes over loopback (gloo), the way a pod or cluster starts it."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_train_completes_and_process_0_alone_writes(tmp_path):
  """Before: process 1 died at its first metrics report (its step timer lived in a log only
  process 0 set up) and process 0 then aborted on the shutdown barrier."""
  run_dir = tmp_path / "run"
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               JAX_NUM_CPU_DEVICES="2")  # 2 processes x 2 devices
    procs.append(subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--config", TINY, "--run-dir", str(run_dir),
         "--no-progress", "checkpoint.every=2", "train.micro_batches=1"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "| response-token loss |" in outs[0][0] and "| response-token loss |" not in outs[1][0]
  with open(run_dir / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == [1, 2, 3, 4]  # one writer: no step logged twice
  assert sorted(int(d.name) for d in (run_dir / "checkpoints").iterdir()) == [2, 4]
  assert not (run_dir / "train.lock").exists()


def test_process_id_out_of_range_is_one_line():
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID="2")
  out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", TINY], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == ("error: JAX_PROCESS_ID=2 with JAX_NUM_PROCESSES=2: expected "
                                "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES")
