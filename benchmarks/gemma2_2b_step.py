"""A Gemma 2 2B-shaped LoRA train step on CPU: step time, compile time, peak memory (24 GB box).

Usage: python benchmarks/gemma2_2b_step.py [--length 256] [--steps 2] [--weights bfloat16]
           [--matmul params|bfloat16] [--remat] [--layers 2,8,26] [--skip-2b] [--no-record]

Random bfloat16 weights with model.init_params' tree and distribution, generated one layer (or
embedding row block) at a time, so no float32 copy of the 2.6B parameters ever exists. One batch
row of `length` random tokens, loss on every position (the most output-projection work a row can
need). Also measures how the train step's compile time scales with the layer count on the tiny
preset: with the layers under jax.lax.scan it should stay flat.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time

import common  # benchmarks/ is on sys.path when this file is run as a script

LORA_R, LORA_ALPHA = 8, 16.0


def quantize_int8(params):
  """int8 weight-only base (jax_it/quant.py): per-output-channel scales, bf16 activations."""
  from jax_it import quant  # pylint: disable=g-import-not-at-top
  return quant.quantize_int8(params)


@functools.cache
def _filler(shape: tuple[int, ...], dtype, slice_elems: int = 1 << 24):
  """A jitted key -> 0.02 * normal array of `shape`, generated one leading-axis slice at a time.

  Only one float32 slice exists at a time, the result is born in `dtype`; the last slice may
  overlap the one before (dynamic_update_slice clamps it), which random weights do not mind.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rows, rest = shape[0], shape[1:]
  chunk = max(1, min(rows, slice_elems // max(1, math.prod(rest))))

  def fill(key):
    def body(i, out):
      block = 0.02 * jax.random.normal(jax.random.fold_in(key, i), (chunk, *rest))
      return jax.lax.dynamic_update_slice_in_dim(out, block.astype(dtype), i * chunk, 0)
    return jax.lax.fori_loop(0, -(-rows // chunk), body, jnp.zeros(shape, dtype))

  return jax.jit(fill)


def random_params(key, cfg, dtype):
  """The tree and distribution of model.init_params (final norm zero), built slice by slice.

  One jit of model.init_params asks XLA for ~27 GB of temporaries at the 2B shape.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jax_it import model  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg, dtype))
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(key, len(leaves))
  params = jax.tree.unflatten(treedef, [_filler(x.shape, jnp.dtype(dtype))(k)
                                        for k, x in zip(keys, leaves)])
  params["final_norm"]["scale"] = jnp.zeros_like(params["final_norm"]["scale"])
  return params


def build(cfg, dtype, weights: str = "bfloat16", remat: bool = False):
  """(params, step, adapter, opt_state, mesh) for a random model of cfg."""
  import jax  # pylint: disable=g-import-not-at-top

  from jax_it import lora, train  # pylint: disable=g-import-not-at-top

  params = random_params(jax.random.key(0), cfg, dtype)
  if weights == "int8":
    params = quantize_int8(params)
  build.param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  mesh = train.make_mesh()
  opt = train.make_optimizer(2e-4, weight_decay=0.01)
  adapter = lora.init(jax.random.key(1), cfg, lora.LoraConfig(r=LORA_R, alpha=LORA_ALPHA))
  step = train.make_train_step(cfg, opt, mesh, remat=remat)
  return (train.replicate(params, mesh), step, train.replicate(adapter, mesh),
          train.replicate(opt.init(adapter), mesh), mesh)


def time_steps(cfg, dtype, length: int, steps: int, clock: common.CompileClock, rows: int = 1,
               weights: str = "bfloat16", remat: bool = False) -> dict:
  """Compile (first call) and then `steps` timed steps on one random batch."""
  import jax  # pylint: disable=g-import-not-at-top

  from jax_it import train  # pylint: disable=g-import-not-at-top

  t = time.perf_counter()
  params, step, adapter, opt_state, mesh = build(cfg, dtype, weights, remat)
  jax.block_until_ready(params)
  init_s, rss_init = time.perf_counter() - t, common.peak_rss_gb()
  raw = common.random_batch(rows, length, cfg.vocab_size)
  batch = train.shard_batch(train.add_loss_index(raw), mesh)
  clock.take()
  t = time.perf_counter()
  adapter, opt_state, m = step(adapter, opt_state, params, batch)
  jax.block_until_ready(m)
  first_s, compile_s = time.perf_counter() - t, clock.take()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    adapter, opt_state, m = step(adapter, opt_state, params, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return {"param_gb": build.param_bytes / 1e9, "init_s": init_s, "rss_init_gb": rss_init,
          "first_s": first_s, "compile_s": compile_s,
          "step_s": sorted(times)[len(times) // 2] if times else float("nan"),
          "loss": float(m["loss"]), "flops": common.step_flops(
              cfg, rows, length, common.our_logit_rows(raw), r=LORA_R)}


def layer_scaling(layers: list[int],
                  clock: common.CompileClock) -> list[tuple[int, float, float]]:
  """(layers, compile s, step s) of the tiny preset at each layer count."""
  from jax_it import families  # pylint: disable=g-import-not-at-top
  base = families.PRESETS["gemma2-tiny"]
  out = []
  for n in layers:
    cfg = dataclasses.replace(base, num_layers=n, local_layers=families.layer_pattern(n, 2))
    r = time_steps(cfg, "float32", 64, 2, clock, rows=2)
    out.append((n, r["compile_s"], r["step_s"]))
    print(f"  tiny preset, {n} layers: compile {r['compile_s']:.2f} s, step {r['step_s']:.3f} s",
          flush=True)
  return out


def report(big: dict | None, scaling, args) -> str:
  lines = []
  if big is not None:
    tok_s = args.length / big["step_s"]
    lines += [
        "| quantity | value |", "|---|---|",
        f"| base params ({args.weights}) | {big['param_gb']:.2f} GB |",
        f"| params init (bf16, slice by slice) | {big['init_s']:.1f} s, "
        f"RSS {big['rss_init_gb']:.2f} GB |",
        f"| compile (trace + lower + XLA) | {big['compile_s']:.1f} s |",
        f"| first step (compile + run) | {big['first_s']:.1f} s |",
        f"| step, median of {args.steps} | {big['step_s']:.2f} s ({tok_s:.1f} tokens/s) |",
        f"| model FLOPs/step | {big['flops'] / 1e12:.2f} TFLOP "
        f"({big['flops'] / big['step_s'] / 1e9:.0f} GFLOP/s) |",
        f"| peak RSS of the process | **{common.peak_rss_gb():.2f} GB** |",
        f"| loss after one step | {big['loss']:.4f} |", ""]
  if scaling:
    lines += ["| tiny preset layers | compile s | step s |", "|---|---|---|"]
    lines += [f"| {n} | {c:.2f} | {s:.3f} |" for n, c, s in scaling]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--length", type=int, default=256, help="tokens in the one batch row")
  ap.add_argument("--steps", type=int, default=2, help="timed steps after the compiling one")
  ap.add_argument("--weights", choices=("bfloat16", "int8"), default="bfloat16")
  ap.add_argument("--matmul", choices=("params", "bfloat16"), default="params",
                  help="model.matmul: bfloat16 = bfloat16 inputs, float32 accumulation/activations")
  ap.add_argument("--remat", action="store_true", help="recompute layers in the backward pass")
  ap.add_argument("--layers", default="2,8,26", help="tiny-preset layer counts for compile time")
  ap.add_argument("--skip-2b", action="store_true", help="only the compile-time scaling")
  ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
  args = ap.parse_args()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jax_it import families  # pylint: disable=g-import-not-at-top

  clock = common.CompileClock()
  scaling = layer_scaling([int(n) for n in args.layers.split(",") if n], clock)
  big = None
  if not args.skip_2b:
    print("  gemma2-2b: building random bf16 weights and compiling...", flush=True)
    cfg = families.PRESETS["gemma2-2b"]
    if args.matmul != "params":
      cfg = dataclasses.replace(cfg, matmul_dtype=args.matmul)
    big = time_steps(cfg, jnp.bfloat16, args.length, args.steps, clock, weights=args.weights,
                     remat=args.remat)
  text = report(big, scaling, args)
  print(text)
  if not args.no_record:
    common.record(common.section(
        "gemma2_2b_step.py: Gemma 2 2B-shaped LoRA step on CPU",
        f"batch 1 x {args.length} random tokens, loss on every position, LoRA r={LORA_R} on "
        f"q_proj, v_proj, random weights, base {args.weights}, model.matmul={args.matmul}, "
        f"remat={args.remat}", text))


if __name__ == "__main__":
  main()
