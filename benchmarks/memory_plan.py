"""The memory plan (jax_it/run/plan.py) against the peak RSS of real train steps, on CPU.

Usage: python benchmarks/memory_plan.py [--cases default,gemma2-2b] [--steps 3] [--no-record]
       python benchmarks/memory_plan.py --reuse [--no-record]

Each case runs in two fresh processes. The first computes the plan from shapes alone (no weights
loaded; the step compiled for its memory analysis). The second does what `run.py train` does
before and during its first steps: import, load the base (the packaged GGUF, or random weights),
place it, build the adapter, the optimizer state and the step, then run `--steps` steps on a
worst-case batch (batch_size x max_len random tokens, every position in the loss, as the plan
assumes). It reads VmRSS/VmHWM from /proc at each phase and resets the peak (clear_refs 5)
between phases, so load, first step (compile) and later steps each get their own peak.

Cases: "default" is configs/default.yaml (the packaged Gemma 3 270M); "gemma2-2b" is
configs/gemma2_2b_alpaca.yaml (int8 base, bfloat16, remat, batch 2 x 512, LoRA r=8 on q, v)
with random Gemma 2 2B weights (model.path=random:gemma2-2b), built slice by slice as
gemma2_2b_step.py does: load_model's random path jits init_params whole, ~27 GB at this shape.

--reuse: compile seconds of a train step's first calls after memory_plan compiled it, against a
fresh step's, on the tiny config: 1 device, and 4 CPU devices data-parallel and sharded.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time

import common  # benchmarks/ is on sys.path when this file is run as a script

CASES = {"default": ("configs/default.yaml", []),
         "gemma2-2b": ("configs/gemma2_2b_alpaca.yaml", ["model.path=random:gemma2-2b"])}
ROOT = common.HERE.parent
GB = 1e9


def proc_status(field: str) -> int:
  """A VmRSS/VmHWM-style field of this process's /proc status, in bytes."""
  with open("/proc/self/status") as f:
    line = next(x for x in f if x.startswith(field + ":"))
  return int(line.split()[1]) * 1024


def reset_peak():
  """Start VmHWM afresh from the current RSS (Linux >= 4.0)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


# ---------------------------------------------------------------------------------------------
# The two child processes


def run_config(case: str):
  from jax_it import config  # pylint: disable=g-import-not-at-top
  path, overrides = CASES[case]
  return config.load_config(str(ROOT / path), overrides)


def model_config(cfg):
  """The ModelConfig load_model gives, without loading: the preset (the packaged model is the
  gemma3-270m preset), a random model's table widened to the packaged tokenizer's ids."""
  from jax_it import families  # pylint: disable=g-import-not-at-top
  name = cfg.model.path.split(":", 1)[-1]
  mcfg = families.PRESETS[name]
  if cfg.model.path.startswith("random:"):
    mcfg = dataclasses.replace(mcfg, vocab_size=max(mcfg.vocab_size, 262_144))
  return mcfg


def child_plan(case: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from jax_it import train  # pylint: disable=g-import-not-at-top
  from jax_it.run import plan  # pylint: disable=g-import-not-at-top
  cfg = run_config(case)
  clock = common.CompileClock()
  t = time.perf_counter()
  p = plan.memory_plan(cfg, model_config(cfg), train.make_mesh(jax.devices()))
  est = plan.memory_plan(cfg, model_config(cfg), train.make_mesh(jax.devices()),
                         compile_step=False)
  return {"plan": p, "text": plan.format_plan(p), "estimate": est["temporaries"],
          "plan_s": time.perf_counter() - t, "compile_s": clock.take(),
          "peak_rss": proc_status("VmHWM")}


def load_base(cfg, mcfg):
  """(params, mcfg) as load_model returns them; random 2B weights slice by slice."""
  from jax_it.run import setup  # pylint: disable=g-import-not-at-top
  if not cfg.model.path.startswith("random:"):
    params, loaded, _ = setup.load_model(cfg.model)
    return params, loaded
  import gemma2_2b_step  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jax_it import quant  # pylint: disable=g-import-not-at-top
  from jax_it.run import plan  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
  params = gemma2_2b_step.random_params(jax.random.key(0), mcfg, dtype)
  if cfg.model.quant == "int8":
    params = quant.quantize_int8(params, dtype)
  return params, plan.run_model_config(cfg, mcfg)


def release_free_heap():
  """Collect garbage and hand glibc's free heap back to the OS: RSS then shows live memory."""
  import ctypes  # pylint: disable=g-import-not-at-top
  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)


def child_steps(case: str, steps: int) -> dict:
  """Phase by phase: imports, tokenizer, base, state, `steps` steps as train runs them, then one
  more step after release_free_heap (its start and peak: live memory only)."""
  import jax  # pylint: disable=g-import-not-at-top

  from jax_it import lora, train, weights  # pylint: disable=g-import-not-at-top
  from jax_it.run import setup  # pylint: disable=g-import-not-at-top
  out = {"rss_imports": proc_status("VmRSS")}
  cfg = run_config(case)
  weights.load_tokenizer(setup.packaged_gemma_path())  # cached: load_model's own call reuses it
  out["rss_tokenizer"] = proc_status("VmRSS")
  t = time.perf_counter()
  params, mcfg = load_base(cfg, model_config(cfg))
  mesh = train.make_mesh()
  params = (train.shard_params(params, mesh) if cfg.train.parallel == "sharded"
            else train.replicate(params, mesh))
  jax.block_until_ready(params)
  gc.collect()
  out.update(load_s=time.perf_counter() - t, peak_load=proc_status("VmHWM"),
             rss_loaded=proc_status("VmRSS"))
  optimizer, _ = train.optimizer(cfg.train, max(cfg.train.max_steps, 1))
  adapter = lora.init(jax.random.key(cfg.lora.seed), mcfg, cfg.lora, params=params)
  adapter, opt_state = train.replicate(adapter, mesh), train.replicate(optimizer.init(adapter),
                                                                       mesh)
  step = train.make_train_step(mcfg, optimizer, mesh, cfg.train, remat=cfg.model.remat)
  raw = common.random_batch(cfg.train.batch_size, cfg.data.max_len, mcfg.vocab_size)
  key = jax.random.key(cfg.train.seed)
  clock, times, starts, peaks = common.CompileClock(), [], [], []
  for i in range(steps + 1):
    if i == steps:
      release_free_heap()
    reset_peak()
    starts.append(proc_status("VmRSS"))
    t = time.perf_counter()
    batch = train.prepare_batch(raw, mesh, cfg.train.micro_batches)
    adapter, opt_state, m = step(adapter, opt_state, params, batch, jax.random.fold_in(key, i))
    jax.block_until_ready((adapter, opt_state, m))
    times.append(time.perf_counter() - t)
    peaks.append(proc_status("VmHWM"))
  out.update(step_s=times, step_starts=starts, step_peaks=peaks, compile_s=clock.take(),
             loss=float(m["loss"]))
  return out


# ---------------------------------------------------------------------------------------------
# Does the loop's first call reuse the plan's compile? (tiny config, compile seconds)


def child_reuse(spec: str) -> dict:
  """Compile seconds of the first calls of a train step, after memory_plan compiled it and
  without: spec "devices:parallel" (the device count is set by the parent's environment)."""
  import jax  # pylint: disable=g-import-not-at-top

  from jax_it import config, families, lora, model, train  # pylint: disable=g-import-not-at-top
  from jax_it.run import plan  # pylint: disable=g-import-not-at-top
  parallel = spec.split(":")[1]
  cfg = config.load_config(str(ROOT / "configs/tiny.yaml"),
                           ["train.micro_batches=1", f"train.parallel={parallel}"])
  mcfg = plan.run_model_config(cfg, families.PRESETS["gemma2-tiny"])
  mesh = train.make_mesh()
  optimizer, _ = train.optimizer(cfg.train, cfg.train.max_steps)
  params = model.init_params(jax.random.key(0), mcfg)
  params = (train.shard_params(params, mesh) if parallel == "sharded"
            else train.replicate(params, mesh))
  raw = common.random_batch(cfg.train.batch_size, cfg.data.max_len, mcfg.vocab_size)
  keys = [jax.random.fold_in(jax.random.key(cfg.train.seed), i) for i in range(3)]
  clock, out = common.CompileClock(), {"devices": jax.device_count()}
  for with_plan in (True, False):
    step = train.make_train_step(mcfg, optimizer, mesh, cfg.train)
    if not hasattr(step, "jitted"):  # until make_train_step exposes it, its closure holds it
      step.jitted = next(c.cell_contents for c in step.__closure__
                         if hasattr(c.cell_contents, "lower"))
    adapter = lora.init(jax.random.key(cfg.lora.seed), mcfg, cfg.lora, params=params)
    state = train.replicate(adapter, mesh), train.replicate(optimizer.init(adapter), mesh)
    batches = [train.prepare_batch(raw, mesh) for _ in keys]
    clock.take()
    if with_plan:
      plan.memory_plan(cfg, mcfg, mesh, step=step)
      out["plan_compile_s"] = clock.take()
    calls = []
    for batch, key in zip(batches, keys):
      *state, m = step(*state, params, batch, key)
      jax.block_until_ready(m)
      calls.append(clock.take())
    out["calls_after_plan_s" if with_plan else "calls_fresh_s"] = calls
  return out


def reuse() -> str:
  lines = ["| devices, train.parallel | plan's compile s | compile s of calls 1-3 after the plan "
           "| compile s of calls 1-3, no plan |", "|---|---|---|---|"]
  for spec in ("1:data", "4:data", "4:sharded"):
    r = child("reuse", spec, 0, {"JAX_NUM_CPU_DEVICES": spec.split(":")[0]})
    lines.append(f"| {r['devices']}, {spec.split(':')[1]} | {r['plan_compile_s']:.2f} | "
                 + " | ".join(", ".join(f"{s:.2f}" for s in r[k])
                              for k in ("calls_after_plan_s", "calls_fresh_s")) + " |")
    print(lines[-1], flush=True)
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The parent: run, compare, report


def child(mode: str, case: str, steps: int, env: dict | None = None) -> dict:
  cmd = [sys.executable, __file__, "--child", mode, "--cases", case, "--steps", str(steps)]
  run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False,
                       env=dict(os.environ, **(env or {})))
  if run.returncode:
    sys.exit(f"{mode} {case} failed:\n{run.stderr[-4000:]}")
  return json.loads(run.stdout.strip().splitlines()[-1])


def compare(case: str, steps: int) -> tuple[dict, str]:
  planned = child("plan", case, steps)
  print(f"[{case}] plan ({planned['plan_s']:.1f} s):\n{planned['text']}", flush=True)
  m = child("steps", case, steps)
  p = planned["plan"]
  total, temps = p["total"], p["temporaries"]
  host = m["rss_tokenizer"]  # python, jax, jax_it and the tokenizer: no device holds these
  as_train = max([m["peak_load"], *m["step_peaks"][:steps]])  # no heap released: as train runs
  live_start, live_peak = m["step_starts"][-1], m["step_peaks"][-1]
  rows = [
      ("plan: base + LoRA + optimizer + batch", total - temps - p["outputs"]),
      (f"plan: step temporaries ({p['temporaries_source']}; the estimate says "
       f"{planned['estimate'] / GB:.2f})", temps),
      ("**plan: total per device**", total),
      ("plan: while quantizing to int8 (loading device)", p["quantize_peak"]),
      ("RSS after imports (python, jax, jax_it)", m["rss_imports"]),
      ("RSS after the tokenizer too (host-only: no device holds these)", host),
      ("peak RSS while loading the base", m["peak_load"]),
      ("RSS with the base loaded and placed", m["rss_loaded"]),
      ("peak RSS of step 1 (compile + run)", m["step_peaks"][0]),
      (f"peak RSS of steps 2-{steps}", max(m["step_peaks"][1:steps] or [0])),
      ("**peak RSS of the process, as train runs**", as_train),
      ("RSS before one more step, free heap released (live memory)", live_start),
      ("peak RSS of that step", live_peak)]
  lines = ["| quantity | GB |", "|---|---|"]
  lines += [f"| {name} | {n / GB:.2f} |" for name, n in rows]
  need = max(total, p["quantize_peak"])
  ratios = [
      ("**max(plan total, plan while quantizing) / (process peak - RSS after imports and "
       "tokenizer)**", need / (as_train - host)),
      ("plan / (process peak - RSS after imports and tokenizer)", total / (as_train - host)),
      ("plan / (live step peak - RSS after imports and tokenizer)", total / (live_peak - host)),
      ("plan temporaries / (live step peak - live RSS before it)",
       temps / (live_peak - live_start)),
      ("(plan + RSS after imports and tokenizer) / process peak", (total + host) / as_train)]
  if p["quantize_peak"]:
    ratios.append(("plan while quantizing / (peak while loading - RSS after imports and "
                   "tokenizer)", p["quantize_peak"] / (m["peak_load"] - host)))
  lines += ["", "| ratio | value |", "|---|---|"]
  lines += [f"| {name} | {r:.2f} |" for name, r in ratios]
  lines += ["", f"Plan process: {planned['plan_s']:.1f} s ({planned['compile_s']:.1f} s of it "
            f"compiling), peak RSS {planned['peak_rss'] / GB:.2f} GB. Steps process: load "
            f"{m['load_s']:.1f} s; steps {', '.join(f'{s:.1f}' for s in m['step_s'])} s "
            f"(the first includes {m['compile_s']:.1f} s of compiling); loss {m['loss']:.4f}."]
  return {"plan": planned, "measured": m}, "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", default="default,gemma2-2b", help=f"of {', '.join(CASES)}")
  ap.add_argument("--steps", type=int, default=3, help="train steps, the first compiling")
  ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
  ap.add_argument("--reuse", action="store_true",
                  help="only: does the loop's first call reuse the plan's compile (tiny config)")
  ap.add_argument("--child", choices=("plan", "steps", "reuse"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    run = {"plan": lambda: child_plan(args.cases), "reuse": lambda: child_reuse(args.cases),
           "steps": lambda: child_steps(args.cases, args.steps)}[args.child]
    print(json.dumps(run()))
    return
  if args.reuse:
    text = reuse()
    if not args.no_record:
      common.record(f"\n### Compile reuse: the plan's compile, then the loop's calls\n\n"
                    f"- command: `{common.command()}`\n- date: {common.utc_date()}\n"
                    f"- machine: {common.machine()}\n- configs/tiny.yaml, micro_batches 1, "
                    "random batch 4 x 128; compile seconds from jax.monitoring\n\n"
                    f"{text}\n")
    return
  texts = []
  for case in args.cases.split(","):
    path, overrides = CASES[case]
    _, text = compare(case, args.steps)
    print(text, flush=True)
    texts.append(f"### {case}: `{path}`{' ' + ' '.join(overrides) if overrides else ''}\n\n"
                 f"{text}")
  if not args.no_record:
    common.record(common.section(
        "memory_plan.py: the memory plan against measured peak RSS",
        f"{args.steps} steps (+1 after malloc_trim) on a worst-case batch (every position in "
        "the loss), 1 CPU device; RSS from /proc/self/status, the peak reset between phases",
        "\n\n".join(texts)))


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
