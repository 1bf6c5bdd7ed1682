"""Numerics on the accelerator: tiny Gemma 1, 2 and 3 against transformers on the same device.

Usage: python benchmarks/gpu_numerics.py [--out results.md]

float32 on both sides, full-precision matmuls on both (JAX's default on GPUs rounds float32
matmul inputs to TF32; torch's does not): logits of tiny random models within 1e-5 relative
(our model.forward vs transformers, eager attention), then a PEFT LoRA on every linear layer:
loss within 1e-5 and every adapter gradient within 1e-4 (norm-relative). The same checks as the
CPU tests (tests/test_model.py, tests/test_lora.py), on whatever device JAX and torch find.
Exits non-zero when a check fails.
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
  body = ["| family | logits (tol 1e-5) | loss (1e-5) | worst LoRA grad (1e-4) | |",
          "|---|---|---|---|---|"]
  body += [f"| {r['family']} | {r['logits']:.2e} | {r['loss']:.2e} | {r['grads']:.2e} | "
           f"{'ok' if r['ok'] else 'FAILED'} |" for r in rows]
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
