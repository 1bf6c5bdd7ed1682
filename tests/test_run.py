"""run.py end to end, tiny config: train, SIGKILL resume, generate, export, compare, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def run(*args, check=True, timeout=600):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, check=False)
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny config with DoRA adapters: train, generate, export --merged and compare against
  PEFT below all run through the magnitude vectors (plain LoRA runs end to end in
  test_chat_run.py and test_serve.py)."""
  run_dir = str(tmp_path_factory.mktemp("runs") / "tiny")
  out = run("--config", TINY, "--run-dir", run_dir, "--no-progress", "lora.dora=true")
  return run_dir, out


def test_train_writes_logs_checkpoints_and_report(trained):
  run_dir, out = trained
  assert sorted(losses(run_dir)) == [1, 2, 3, 4]
  assert os.path.isdir(os.path.join(run_dir, "checkpoints", "4"))
  rows = json.load(open(os.path.join(run_dir, "eval.json")))
  assert len(rows) == 2 and {"response_base", "response_tuned", "output"} <= set(rows[0])
  assert os.path.getsize(os.path.join(run_dir, "loss.png")) > 1000
  assert "| response-token loss |" in out.stdout
  assert any(os.scandir(os.path.join(run_dir, "tensorboard")))


def test_resume_after_sigkill_gives_the_uninterrupted_losses(tmp_path):
  args = ["--config", TINY, "--no-progress", "train.max_steps=8", "train.eval_every=0",
          "checkpoint.every=2", "checkpoint.async_save=true", "report.eval_samples=0"]
  straight = str(tmp_path / "straight")
  run(*args, "--run-dir", straight)
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *args, "--run-dir",
                           killed], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and max(_safe_losses(killed), default=0) < 5:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(_safe_losses(killed)) < 8, "the run finished before it could be killed"
  out = run(*args, "--run-dir", killed)
  assert "resuming from the step-" in out.stdout, out.stdout
  a, b = losses(straight), losses(killed)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-6)


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
  run_dir = str(tmp_path / "interrupted")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "--config", TINY,
                           "--no-progress", "--run-dir", run_dir, "train.max_steps=400",
                           "train.eval_every=0", "checkpoint.every=0"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and max(_safe_losses(run_dir), default=0) < 2:
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
  saved = [int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit()]
  assert saved and 2 <= max(saved) < 400


def _safe_losses(run_dir):
  try:
    return losses(run_dir)
  except (OSError, json.JSONDecodeError):
    return {}


def test_generate_export_and_compare(trained, tmp_path):
  import torch
  from transformers import AutoModelForCausalLM

  from jax_it import config, model, weights
  from jax_it.run import setup

  run_dir, _ = trained
  out = run("generate", "--run-dir", run_dir, "--prompt", "Reverse the words.", "--input",
            "red blue", "--base")
  assert out.stdout.count("[base") == 1 and out.stdout.count("[tuned") == 1

  export_dir = str(tmp_path / "export")
  run("export", "--run-dir", run_dir, "--out", export_dir, "--merged", "--gguf")
  assert json.load(open(os.path.join(export_dir, "adapter_config.json")))["use_dora"] is True
  hf = AutoModelForCausalLM.from_pretrained(os.path.join(export_dir, "merged"),
                                            attn_implementation="eager")
  ctx = setup.make_context(config.load_config(os.path.join(run_dir, "config.yaml"), []), run_dir)
  adapter = setup.load_adapter(ctx)
  tokens = np.random.default_rng(0).integers(3, 1000, (2, 40))
  ours = np.asarray(model.forward(ctx.params, jnp.asarray(tokens, jnp.int32), ctx.mcfg,
                                  lora=adapter))
  theirs = hf(torch.as_tensor(tokens)).logits.detach().numpy()
  assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4
  # the GGUF file holds the same DoRA-merged model (float16 weights)
  params, cfg = weights.load(os.path.join(export_dir, "model-f16.gguf"))
  gguf = np.asarray(model.forward(params, jnp.asarray(tokens, jnp.int32), cfg))
  assert np.abs(gguf - ours).max() / np.abs(ours).max() <= 1e-2

  out = run("compare", "--run-dir", run_dir)
  assert "OK: within tolerance" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.yaml"], "config file not found"),
    (["--config", TINY, "lora.rank=3"], "valid keys"),
    (["--config", TINY, "model.path=/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["--config", TINY, "--run-dir", "/proc/forbidden"], "not writable"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
  out = run(*args, check=False, timeout=300)
  assert out.returncode == 2
  assert message in out.stderr and "Traceback" not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_divergence_stops_naming_the_step_and_saves_nothing(tmp_path):
  run_dir = str(tmp_path / "diverged")
  out = run("--config", TINY, "--no-progress", "--run-dir", run_dir, "train.lr=1e38",
            "train.clip_norm=0", "train.warmup_steps=0", "train.schedule=constant",
            "train.micro_batches=1", "train.eval_every=0", "checkpoint.every=1", check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "not finite" in out.stderr and "at step 1;" in out.stderr, out.stderr
  assert "Traceback" not in out.stderr
  saved = [d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit()]
  assert saved == []  # the diverged state never reached a checkpoint


def test_run_dir_of_another_run_is_refused(trained):
  run_dir, _ = trained
  out = run("--config", TINY, "--run-dir", run_dir, "lora.r=2", check=False)
  assert out.returncode == 2 and "different run" in out.stderr and "Traceback" not in out.stderr
