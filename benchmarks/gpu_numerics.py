"""Numerics on the accelerator: tiny Gemma 1, 2 and 3 against transformers on the same device.

Usage: python benchmarks/gpu_numerics.py [--out results.md]

float32 on both sides, full-precision matmuls on both (JAX's default on GPUs rounds float32
matmul inputs to TF32; torch's does not): logits of tiny random models within 1e-5 relative
(our model.forward vs transformers, eager attention), then a PEFT LoRA on every linear layer:
loss within 1e-5 and every adapter gradient within 1e-4 (norm-relative). The same checks as the
CPU tests (tests/test_model.py, tests/test_lora.py), on whatever device JAX and torch find.
Then the backend's fused attention kernel (cuDNN on a GPU) against the XLA path on packed rows
(check_kernel). Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import common  # pylint: disable=wrong-import-position  # benchmarks/ is on sys.path

LOGIT_TOL, LOSS_TOL, GRAD_TOL = 1e-5, 1e-5, 1e-4


def check(family: str, device: str, workdir: str) -> dict:
  """Logit, loss and worst LoRA-gradient errors of one family on `device`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  from jax_it import lora, model, train, weights  # pylint: disable=g-import-not-at-top
  from jax_it import reference as ref  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, family)
  hf = ref.tiny_hf(family, save_to=path).to(device)
  params, cfg = weights.load(path)
  batch = ref.random_batch(np.random.default_rng(0), 2, 24, cfg.vocab_size)
  tokens = torch.as_tensor(batch["tokens"], dtype=torch.long, device=device)
  with torch.no_grad():
    want = hf(tokens).logits.float().cpu().numpy()
  got = model.forward(params, jnp.asarray(batch["tokens"]), cfg)
  out = {"family": family, "logits": ref.rel_err(np.asarray(got), want)}

  pm = ref.peft_model(hf, lora.ALL_LINEAR, r=4, alpha=8.0)
  pm.save_pretrained(os.path.join(workdir, f"{family}-adapter"))
  adapter = lora.load_peft(os.path.join(workdir, f"{family}-adapter"), cfg)
  logits = pm(tokens).logits.float()
  loss_ref = ref.masked_nll(logits.cpu(), batch["targets"], batch["loss_mask"])
  loss_ref.backward()
  theirs = ref.lora_grads(pm)
  b = train.add_loss_index(batch)
  loss, grads = jax.value_and_grad(
      lambda a: train.mean_loss(a, params, b, cfg, train.TrainConfig(loss_chunk=16)))(adapter)
  gdir = os.path.join(workdir, f"{family}-grads")
  lora.save_peft(lora.Lora(grads.weights, adapter.cfg), cfg, gdir)
  ours = load_file(os.path.join(gdir, "adapter_model.safetensors"))
  out["loss"] = abs(float(loss) - loss_ref.item()) / loss_ref.item()
  out["grads"] = max(ref.norm_rel_err(ours[k], theirs[k]) for k in theirs)
  out["ok"] = (out["logits"] <= LOGIT_TOL and out["loss"] <= LOSS_TOL and out["grads"] <= GRAD_TOL
               and set(ours) == set(theirs))
  return out


KERNEL_SLACK = 2.0  # the kernel may be at most this many times further from float32 than XLA


def check_kernel(workdir: str) -> dict:
  """The backend's fused attention kernel (model.attention=auto: cuDNN on GPUs, splash on TPUs)
  and the XLA path, both with bfloat16 matmuls (cuDNN's only mode), against the float32 XLA path
  on packed rows of 256 tokens of a tiny Gemma 3 (no soft-cap, so cuDNN takes it): loss and
  worst LoRA gradient errors, the kernel's within KERNEL_SLACK times XLA's. On a CPU, which has
  no fused kernel, the cuDNN call's arguments run through JAX's XLA implementation of the same
  function."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jax_it import lora, ops, train, weights  # pylint: disable=g-import-not-at-top
  from jax_it import reference as ref  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, "kernel-gemma3")
  ref.tiny_hf("gemma3", save_to=path, weight_std=0.1)
  params, cfg = weights.load(path)
  cfg = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  kernel = {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend())
  if kernel is None:
    kernel = "cudnn (XLA stand-in)"
    ops._BACKEND_ATTENTION[jax.default_backend()] = "cudnn"  # pylint: disable=protected-access
    ops.CUDNN_IMPLEMENTATION = "xla"
  rng = np.random.default_rng(0)
  batch = ref.random_batch(rng, 2, 256, cfg.vocab_size)
  seg = np.repeat([1, 2, 3], [100, 100, 56])
  batch["segment_ids"][:] = seg
  batch["positions"][:] = np.concatenate([np.arange(100), np.arange(100), np.arange(56)])
  batch = train.add_loss_index(batch)
  adapter = lora.init(jax.random.key(0), cfg, lora.LoraConfig(r=4, targets="all-linear"))
  adapter = adapter.replace(weights=jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter.weights))

  def loss_and_grads(attention, matmul="bfloat16"):
    c = dataclasses.replace(cfg, attention=attention, matmul_dtype=matmul)
    return jax.jit(jax.value_and_grad(lambda a: train.mean_loss(
        a, params, batch, c, train.TrainConfig(loss_chunk=64))))(adapter)

  def errors(loss, grads):  # against the float32 XLA path
    return (abs(float(loss) - float(l32)) / float(l32),
            max(ref.norm_rel_err(np.asarray(a, np.float64), np.asarray(b, np.float64))
                for a, b in zip(jax.tree.leaves(grads.weights), jax.tree.leaves(g32.weights))))

  assert ops.attention_impl("auto", soft_cap=None, dtype="bfloat16", cached=False,
                            length=256) != "xla"
  l32, g32 = loss_and_grads("xla", None)
  (kl, kg), (xl, xg) = errors(*loss_and_grads("auto")), errors(*loss_and_grads("xla"))
  out = {"family": f"gemma3, {kernel}", "loss": kl, "grads": kg, "xla_loss": xl, "xla_grads": xg}
  out["ok"] = kl <= KERNEL_SLACK * xl + 1e-6 and kg <= KERNEL_SLACK * xg + 1e-6
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--families", default="gemma1,gemma2,gemma3", help="comma-separated")
  ap.add_argument("--out", default="", help="also write the markdown section to this file")
  args = ap.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  start = time.perf_counter()
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for family in args.families.split(","):
      r = check(family, device, workdir)
      rows.append(r)
      print(f"  {family}: logits {r['logits']:.2e}, loss {r['loss']:.2e}, grads {r['grads']:.2e}"
            f" {'ok' if r['ok'] else 'FAILED'}", flush=True)
    kr = check_kernel(workdir)
    print(f"  {kr['family']}: loss {kr['loss']:.2e} (xla {kr['xla_loss']:.2e}), grads "
          f"{kr['grads']:.2e} (xla {kr['xla_grads']:.2e}) "
          f"{'ok' if kr['ok'] else 'FAILED'}", flush=True)
  body = ["| family | logits (tol 1e-5) | loss (1e-5) | worst LoRA grad (1e-4) | |",
          "|---|---|---|---|---|"]
  body += [f"| {r['family']} | {r['logits']:.2e} | {r['loss']:.2e} | {r['grads']:.2e} | "
           f"{'ok' if r['ok'] else 'FAILED'} |" for r in rows]
  body += ["", "The attention kernel and the XLA path, both with bfloat16 matmuls, against the "
           "float32 XLA path (packed rows of 256): the kernel may be at most "
           f"{KERNEL_SLACK:g}x as far as XLA is.", "",
           "| kernel | loss | worst LoRA grad | XLA bfloat16: loss | worst LoRA grad | |",
           "|---|---|---|---|---|---|",
           f"| {kr['family']} | {kr['loss']:.2e} | {kr['grads']:.2e} | {kr['xla_loss']:.2e} | "
           f"{kr['xla_grads']:.2e} | {'ok' if kr['ok'] else 'FAILED'} |"]
  rows.append(kr)
  text = common.section(
      "gpu_numerics.py: tiny Gemma 1/2/3 against transformers + PEFT on the same device",
      f"float32, full-precision matmuls; JAX on {jax.devices()[0].device_kind}, torch on {device}",
      "\n".join(body) + f"\n\ntotal {time.perf_counter() - start:.0f} s",
      host=f"{jax.devices()[0].device_kind} device; host {common.machine()}")
  print(text)
  if args.out:
    common.record(text, args.out)
  sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
  main()
