"""NF4 base: our quant.py against qwix (Google's JAX quantization library) on CPU.

Usage: python benchmarks/nf4.py [--rows 2] [--length 256] [--steps 5] [--record]

1. Quantizing the weights of one Gemma 2 2B-shaped layer (q, kv, o, gate/up, down in
   bfloat16): seconds, bytes the base keeps (on this device: jnp.uint4 takes a byte here),
   and how many of the dequantized weights equal bitsandbytes' (when it is installed).
2. A jitted forward + LoRA-gradient step (jax.value_and_grad of train.mean_loss, LoRA r=16 on
   every linear layer, bfloat16 matmuls) on the real Gemma 3 270M: bfloat16 base, int8, our NF4
   with and without double quantization, and qwix's NF4 (its QArray parts stored as our leaves
   and decoded by qwix.dequantize in each layer, in place of quant.dequantize_nf4): step
   seconds (median of --steps rounds, the bases interleaved in each), compile seconds, base
   bytes, XLA's temporaries and the loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import common  # benchmarks/ is on sys.path when this file is run as a script

BLOCK = 64


def qwix_nf4(w, weight_axes: str, in_axes: str, parts: bool):
  """A stacked weight [L, (part,) ...] as qwix's NF4 QArray: blocks of 64 along the last
  contracted axis (the same blocks as ours where 64 divides it), float32 scales (the input
  cast to float32 first: its bfloat16 division would round more than bitsandbytes does)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qwix._src.core import qarray  # pylint: disable=g-import-not-at-top
  lead = 2 if parts else 1
  last = lead + max(weight_axes.index(a) for a in in_axes)
  other = tuple(a for a in range(w.ndim) if a != last)
  return qarray.quantize_api(w.astype(jnp.float32), "nf4", channelwise_axes=other,
                             tiled_axes={last: BLOCK})


def install_qwix_decoding():
  """Make ops.einsum decode {"w": uint4, "w_scale": {"qwix": scale}} leaves with qwix."""
  from qwix._src.core import qarray  # pylint: disable=g-import-not-at-top

  from jax_it import quant  # pylint: disable=g-import-not-at-top
  ours = quant.dequantize_nf4

  def dequantize(w, scale, eq):
    if "qwix" not in scale:
      return ours(w, scale, eq)
    return qarray.dequantize(qarray.QArray(w, scale["qwix"], None, "nf4"))
  quant.dequantize_nf4 = dequantize


def quantize_qwix(params):
  """quant.quantize_nf4's tree with qwix's NF4 weights (int8 embedding, bfloat16 norms)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jax_it import quant  # pylint: disable=g-import-not-at-top

  def weight(block, name, w):
    p = quant._WEIGHTS[(block, name)]  # pylint: disable=protected-access
    q = jax.jit(qwix_nf4, static_argnums=(1, 2, 3))(w, p.weight_axes, p.in_axes,
                                                     p.part is not None)
    return {"w": q.qvalue, "w_scale": {"qwix": q.scale}}
  return quant._quantized(params, jnp.bfloat16, weight)  # pylint: disable=protected-access


def device_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(x.addressable_shards[0].data.on_device_size_in_bytes()
             for x in jax.tree.leaves(tree))


def layer_quantization() -> list[tuple[str, str]]:
  """Quantize one 2B-shaped layer (L = 1) with each method: time, bytes, bitsandbytes match."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jax_it import families, model, quant  # pylint: disable=g-import-not-at-top
  from jax_it.ckpt.stack import to_matrix  # pylint: disable=g-import-not-at-top
  from jax_it.families import PROJECTIONS  # pylint: disable=g-import-not-at-top
  mcfg = dataclasses.replace(families.PRESETS["gemma2-2b"], num_layers=1, local_layers=(True,))
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), mcfg))["layers"]
  weights = {(p.block, p.param): jnp.asarray(0.02 * rng.standard_normal(
      shapes[p.block][p.param]["w"].shape, np.float32), jnp.bfloat16)
      for p in quant._WEIGHTS.values()}  # pylint: disable=protected-access
  methods = {
      "ours, double quant": lambda w, p: quant._quantize_nf4(  # pylint: disable=protected-access
          w, p.weight_axes, p.in_axes, p.part is not None, BLOCK, True),
      "ours, float32 absmax": lambda w, p: quant._quantize_nf4(  # pylint: disable=protected-access
          w, p.weight_axes, p.in_axes, p.part is not None, BLOCK, False),
      "qwix": lambda w, p: jax.jit(qwix_nf4, static_argnums=(1, 2, 3))(
          w, p.weight_axes, p.in_axes, p.part is not None),
  }
  try:
    import bitsandbytes.functional as bnb  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    bnb = None
  rows = []
  n = sum(w.size for w in weights.values())
  for name, fn in methods.items():
    for _ in range(2):  # the first pass compiles
      t = time.perf_counter()
      out = {k: jax.block_until_ready(fn(w, quant._WEIGHTS[k])) for k, w in weights.items()}  # pylint: disable=protected-access
      seconds = time.perf_counter() - t
    nbytes = device_bytes(list(out.values()))
    same = "-"
    if bnb is not None and not name.endswith("double quant"):
      equal = 0
      for p in PROJECTIONS.values():
        q = out[(p.block, p.param)]
        if name == "qwix":
          from qwix._src.core import qarray  # pylint: disable=g-import-not-at-top
          got = qarray.dequantize(q).astype(jnp.bfloat16)
        else:
          got = quant.dequantize_nf4(q[0], q[1], p.eq).astype(jnp.bfloat16)
        got = np.asarray(got[0] if p.part is None else got[0, p.part], np.float32)
        w = weights[(p.block, p.param)]
        w = w[0] if p.part is None else w[0, p.part]
        mat = torch.tensor(to_matrix(np.asarray(w, np.float32), p)).to(torch.bfloat16)
        bq, st = bnb.quantize_4bit(mat, blocksize=BLOCK, quant_type="nf4")
        want = bnb.dequantize_4bit(bq, st).float().numpy()
        equal += int((to_matrix(got, p) == want).sum())
      same = f"{equal / n:.6f}"
    rows.append((name, f"| {name} | {seconds:.2f} | {nbytes / n:.3f} | {same} |"))
  return rows


def step_benchmark(rows: int, length: int, steps: int) -> list[str]:
  """The 270M forward + LoRA-gradient step on each base."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jax_it import lora, quant, train, weights  # pylint: disable=g-import-not-at-top
  params, cfg = weights.load(common.gemma3_gguf())
  cfg = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  del params
  batch = train.add_loss_index(common.random_batch(rows, length, cfg.vocab_size))
  adapter = lora.init(jax.random.key(0), cfg, lora.LoraConfig(r=16, targets="all-linear"))
  install_qwix_decoding()
  bases = {"bfloat16": lambda: bf16, "int8": lambda: quant.quantize_int8(bf16),
           "nf4 ours, double quant": lambda: quant.quantize_nf4(bf16),
           "nf4 ours, float32 absmax": lambda: quant.quantize_nf4(bf16, double_quant=False),
           "nf4 qwix": lambda: quantize_qwix(bf16)}
  built = {}
  for name, make in bases.items():
    t = time.perf_counter()
    base = jax.block_until_ready(make())
    quantize_s = time.perf_counter() - t
    fn = jax.jit(jax.value_and_grad(lambda a, p: train.mean_loss(a, p, batch, cfg)))
    t = time.perf_counter()
    compiled = fn.lower(adapter, base).compile()
    compile_s = time.perf_counter() - t
    loss, _ = jax.block_until_ready(compiled(adapter, base))  # warm-up
    built[name] = (base, compiled, quantize_s, compile_s, float(loss), [])
  for _ in range(steps):  # interleaved rounds: a change in the machine's load hits every base
    for base, compiled, *_, times in built.values():
      t = time.perf_counter()
      jax.block_until_ready(compiled(adapter, base))
      times.append(time.perf_counter() - t)
  out = []
  for name, (base, compiled, quantize_s, compile_s, loss, times) in built.items():
    temp = compiled.memory_analysis().temp_size_in_bytes
    out.append(f"| {name} | {statistics.median(times):.2f} | {compile_s:.1f} | "
               f"{quantize_s:.1f} | {device_bytes(base) / 2**20:.0f} | {temp / 2**20:.0f} | "
               f"{loss:.4f} |")
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=2)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
  args = parser.parse_args()
  quant_rows = layer_quantization()
  step_rows = step_benchmark(args.rows, args.length, args.steps)
  body = "\n".join([
      "One Gemma 2 2B-shaped layer (77.9M weights, bfloat16) quantized to NF4, blocks of 64:",
      "", "| method | seconds | bytes / weight on this device | equal to bitsandbytes |",
      "|---|---|---|---|", *[r for _, r in quant_rows], "",
      f"Forward + LoRA-gradient step of the real Gemma 3 270M ({args.rows} x {args.length} "
      "random tokens, LoRA r=16 all-linear, bfloat16 matmuls):", "",
      "| base | step s | compile s | quantize s | base MiB | XLA temporaries MiB | loss |",
      "|---|---|---|---|---|---|---|", *step_rows])
  text = common.section("NF4 base: quant.py against qwix", "CPU, jax "
                        f"{__import__('jax').__version__}, qwix "
                        f"{__import__('importlib.metadata').metadata.version('qwix')}", body)
  print(text)
  if args.record:
    common.record(text)


if __name__ == "__main__":
  main()
