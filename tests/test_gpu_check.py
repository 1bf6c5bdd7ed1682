"""benchmarks/gpu.sh --smoke: the GPU check's three stages run end to end on this CPU, so the
command a GPU machine gets has run before it gets there."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_runs_every_stage(tmp_path):
  out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--smoke",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-4000:]
  assert "FAILED" not in log and "resumed: ok" in log, log[-4000:]
  numerics = (tmp_path / "numerics.md").read_text()
  assert re.search(r"\| gemma2 \| \S+ \| \S+ \| \S+ \| ok \|", numerics), numerics
  assert re.search(r"\| gemma3, cudnn \(XLA stand-in\)( \| \S+){4} \| ok \|", numerics), numerics
  train = (tmp_path / "train.log").read_text()
  assert "resuming from the step-2 checkpoint" in train, train[-3000:]
  step = (tmp_path / "step.md").read_text()
  assert re.search(r"\| 2 x 64 \| ours \| [\d.]+ \| \d+ \|", step), step
  assert re.search(r"\| 2 x 64 \| torch \| [\d.]+ \| \d+ \| 1.00x \|", step), step
