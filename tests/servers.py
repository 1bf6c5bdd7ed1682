"""One tiny trained run (random Gemma 2, Gemma's chat format) and one `run.py serve` process on
it, shared by test_chat_run.py, test_serve.py and test_judge.py: training, loading and compiling
cost most of their time, so the session trains once and its processes share JAX's compilation
cache."""

import atexit
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
RUN = ["data.path=synth-chat", "data.template=gemma", "data.loss_on=assistant",
       "data.synth_train=16", "data.synth_eval=4", "train.max_steps=2", "train.eval_every=0",
       "checkpoint.every=2", "report.eval_samples=2", "generate.max_new_tokens=8"]

_shared: dict = {}


def _env() -> dict:
  """The processes of a session share JAX's compilation cache: the server and the eval reuse
  what training compiled (the random init alone is ~6 s to compile)."""
  env = dict(os.environ)
  if "cache" in _shared:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", _shared["cache"])
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  return env


def run_py(*args, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
  out = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, check=False,
                       env=_env(), **kw)
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def trained_run(tmp_path_factory) -> str:
  """The run directory, trained on first use in this pytest session."""
  return trained(tmp_path_factory)["run_dir"]


def trained(tmp_path_factory) -> dict:
  """The session's run: run_dir, the training command's stdout and the report files as training
  left them (later tests evaluate again into the same directory)."""
  if "run_dir" not in _shared:
    _shared["cache"] = str(tmp_path_factory.getbasetemp() / "jax_cache")
    run_dir = str(tmp_path_factory.getbasetemp() / "serve_run")
    out = run_py("--config", TINY, "--run-dir", run_dir, "--no-progress", *RUN)
    _shared["run_dir"], _shared["train_stdout"] = run_dir, out.stdout
    _shared["train_files"] = {name: open(os.path.join(run_dir, name)).read() for name in
                              ("eval.json", "eval_metrics.json", "data_summary.json")}
  return {k: _shared[k] for k in ("run_dir", "train_stdout", "train_files")}


def start(run_dir: str, log: str, *extra: str) -> tuple[subprocess.Popen, str]:
  """A `run.py serve` process on a free port; (process, its /v1 URL) once it listens. Its
  output goes to `log` (a pipe nobody reads would fill with access lines and stall it)."""
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "serve", "--run-dir",
                             run_dir, "--port", "0", *extra], cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT, text=True, env=_env())
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None:
    with open(log) as f:
      found = re.search(r"^serving .* on (http://\S+/v1)$", f.read(), re.M)
    if found:
      return proc, found.group(1)
    time.sleep(0.2)
  stop(proc)
  with open(log) as f:
    raise AssertionError(f"serve did not start:\n{f.read()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()


def shared_server(tmp_path_factory) -> tuple[str, str, str]:
  """(run directory, server URL, server log) of the session's one server."""
  if "url" not in _shared:
    run_dir = trained_run(tmp_path_factory)
    log = str(tmp_path_factory.getbasetemp() / "serve.log")
    proc, _shared["url"] = start(run_dir, log)
    _shared["proc"], _shared["log"] = proc, log
    atexit.register(stop, proc)
  return _shared["run_dir"], _shared["url"], _shared["log"]


def server_alive() -> bool:
  return "proc" in _shared and _shared["proc"].poll() is None
