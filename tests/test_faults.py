"""Faults that must not lose work or hide data: a corrupt checkpoint, two trainers on one run
directory, records that cannot train, a missing PyTorch reference, a mistyped command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run(*args, check=True, timeout=600):
  out = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, check=False)
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def losses(run_dir) -> dict[int, float]:
  with open(Path(run_dir) / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
  run_dir = tmp_path / "run"
  args = ["--config", TINY, "--run-dir", str(run_dir), "--no-progress", "train.max_steps=6",
          "checkpoint.every=2", "checkpoint.keep=2", "train.eval_every=0", "report.eval_samples=0"]
  run(*args)
  straight = losses(run_dir)
  # truncate every data file of step 6's LoRA weights, as a disk error or a copy cut short would
  damaged = [p for p in (run_dir / "checkpoints" / "6" / "lora").rglob("*")
             if p.is_file() and p.stat().st_size > 64]
  assert damaged
  for p in damaged:
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
  out = run(*args)
  assert "checkpoint step 6" in out.stderr and "unreadable" in out.stderr, out.stderr
  assert "resuming from the step-4 checkpoint" in out.stdout, out.stdout
  aside = list((run_dir / "corrupt_checkpoints").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith("6-")  # kept, not deleted
  again = losses(run_dir)
  assert sorted(again) == list(range(1, 7))
  np.testing.assert_allclose([again[s] for s in (5, 6)], [straight[s] for s in (5, 6)], rtol=1e-6)
  assert (run_dir / "checkpoints" / "6").is_dir()  # saved again from the replayed steps


def _wait_for(cond, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if cond():
      return True
    time.sleep(0.2)
  return False


def test_second_trainer_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
  run_dir = tmp_path / "run"
  first = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--config", TINY, "--run-dir",
                            str(run_dir), "--no-progress", "train.max_steps=400",
                            "train.eval_every=0", "checkpoint.every=0"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists()
                     and (run_dir / "metrics.jsonl").stat().st_size > 0)
    out = run("--config", TINY, "--run-dir", str(run_dir), check=False)
    assert out.returncode == 2 and f"in use by pid {first.pid}" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert first.poll() is None  # the first trainer runs on
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert (run_dir / "train.lock").exists()  # a killed process cannot clean up
  out = run("--config", TINY, "--run-dir", str(run_dir), "--no-progress", "train.max_steps=2",
            "report.eval_samples=0")
  assert f"taking over the lock of pid {first.pid}" in out.stderr
  assert not (run_dir / "train.lock").exists()  # released at the end


def test_data_summary_counts_what_does_not_train(tmp_path):
  """Skipped, cut and dropped records are counted in the printed summary and data_summary.json;
  a record whose response lies wholly past max_len is dropped, not trained as an empty target."""
  good = [{"instruction": f"Repeat the word {w}.", "output": w} for w in
          ("red", "blue", "green", "gold", "gray", "pink", "teal", "tan", "jade", "lime")]
  lines = [json.dumps(r) for r in good]
  lines.append('{"instruction": "broken')  # malformed JSON: skipped with on_error=skip
  lines.append(json.dumps({"instruction": "Summarize: " + "word " * 300, "output": "short"}))
  lines.append(json.dumps({"instruction": "Count.", "output": " ".join(map(str, range(200)))}))
  path = tmp_path / "records.jsonl"
  path.write_text("\n".join(lines) + "\n")
  run_dir = tmp_path / "run"
  out = run("--config", TINY, "--run-dir", str(run_dir), "--no-progress", f"data.path={path}",
            "data.on_error=skip", "data.splits=[1.0, 0.0, 0.0]", "train.max_steps=1",
            "report.eval_samples=0")
  summary = json.loads((run_dir / "data_summary.json").read_text())
  assert (summary["records_read"], summary["skipped"], summary["train_records"]) == (12, 1, 12)
  assert (summary["truncated"], summary["dropped_no_loss_token"]) == (2, 1)
  assert summary["train_examples"] == 11 and "malformed JSON" in summary["skipped_first"][0]
  assert "1 dropped with no loss token left" in out.stdout and "skipped: " in out.stdout


def test_failed_start_leaves_no_run_directory(tmp_path):
  run_dir = tmp_path / "new"
  out = run("--config", TINY, "--run-dir", str(run_dir), "model.path=/nonexistent/m.gguf",
            check=False)
  assert out.returncode == 2 and "/nonexistent/m.gguf" in out.stderr
  assert not run_dir.exists()


def test_mistyped_command_is_named():
  out = run("frobnicate", check=False, timeout=60)
  assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_compare_without_the_torch_extra_names_it(monkeypatch):
  import argparse

  from jax_it.run import cli
  monkeypatch.setitem(sys.modules, "peft", None)  # as if `pip install -e .` alone
  args = argparse.Namespace(command="compare", config=None, run_dir=None, overrides=[])
  with pytest.raises(cli.UsageError, match=r'pip install -e "\.\[torch\]"'):
    cli.cmd_compare(args)


def test_lock_of_a_dead_or_reused_pid_is_stale(tmp_path):
  from jax_it.run import lock, setup

  dead = subprocess.Popen(["true"])
  dead.wait()
  holder = {"pid": dead.pid, "host": os.uname().nodename, "start_time": "1", "since": "then"}
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps(holder))
  taken = lock.RunLock(str(tmp_path))
  assert taken.held and json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  with pytest.raises(setup.RunError, match=f"in use by pid {os.getpid()}"):
    lock.RunLock(str(tmp_path))
  taken.release()
  # our own pid with another start time: a new process that reuses a dead holder's pid
  holder = {"pid": os.getpid(), "host": os.uname().nodename, "start_time": "-1", "since": "x"}
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps(holder))
  lock.RunLock(str(tmp_path)).release()
  assert not (tmp_path / lock.LOCK_FILE).exists()
