"""`run.py compare`: our model and LoRA gradients against transformers + PEFT on one batch."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jax_it import config, data, export, lora, loop, model, train

TOLERANCES = {"logits": 1e-4, "loss": 1e-5, "lora_grad": 1e-4}


def torch_model(cfg: config.RunConfig, params, mcfg, tmp: str):
  """The transformers model of the same weights: read from the original checkpoint where
  transformers can read it (HF dir, GGUF), else (random presets, Flax) from an HF export."""
  from transformers import AutoModelForCausalLM

  path = loop.packaged_gemma_path() if cfg.model.path == loop.PACKAGED_GEMMA else cfg.model.path
  kw = dict(attn_implementation="eager", dtype="float32")
  if os.path.isfile(path) and path.endswith(".gguf"):
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                gguf_file=os.path.basename(path), **kw)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
    return AutoModelForCausalLM.from_pretrained(path, **kw)
  export.save_hf(params, mcfg, os.path.join(tmp, "hf"))
  return AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), **kw)


def _batch(s: loop.Setup, rows: int = 2) -> dict:
  records = s.splits["validation"] or s.splits["test"] or s.splits["train"]
  dcfg = dataclasses.replace(s.dcfg, max_len=min(s.dcfg.max_len, 256))
  batch = next(iter(data.eval_batches(records[:rows], s.tokenizer, dcfg, rows)))
  return batch


def against_torch(s: loop.Setup, adapter) -> dict:
  """Errors of logits (real tokens), loss and every LoRA gradient, in float32 on both sides."""
  import peft
  import torch

  params, mcfg, _ = loop.load_model(dataclasses.replace(s.cfg.model, dtype="float32",
                                                        matmul="params", quant="none"))
  if adapter is None:  # no run yet: a random adapter with nonzero B exercises the LoRA path
    adapter = lora.init(jax.random.key(0), mcfg, s.lcfg)
    adapter = adapter.replace(weights=jax.tree.map(
        lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), adapter.weights))
  adapter = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapter)
  no_dropout = dataclasses.replace(adapter.cfg, dropout=0.0)
  adapter = lora.Lora(adapter.weights, no_dropout)
  batch = _batch(s)
  real = np.asarray(batch["segment_ids"]) > 0
  with tempfile.TemporaryDirectory() as tmp:
    hf = torch_model(s.cfg, params, mcfg, tmp)
    lora.save_peft(adapter, mcfg, os.path.join(tmp, "adapter"))
    pm = peft.PeftModel.from_pretrained(hf, os.path.join(tmp, "adapter"), is_trainable=True)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    attn = torch.as_tensor(real, dtype=torch.long)
    logits_t = pm(tokens, attention_mask=attn).logits
    # float64 loss: a float32 log_softmax's backward over a large vocab is the least precise
    # step of the reference (~2.5e-4 on LoRA gradients of the real Gemma 3 270M)
    logp = torch.log_softmax(logits_t.double(), -1)
    mask = torch.as_tensor(batch["loss_mask"], dtype=torch.float64)
    nll = -logp.gather(-1, torch.as_tensor(batch["targets"], dtype=torch.long)[..., None])[..., 0]
    loss_t = (nll * mask).sum() / mask.sum()
    loss_t.backward()
    grads_t = {n.replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters()
               if "lora_" in n}
    lora.save_peft(_grads(adapter, params, mcfg, batch), mcfg, os.path.join(tmp, "grads"))
    from safetensors.numpy import load_file
    grads_j = load_file(os.path.join(tmp, "grads", "adapter_model.safetensors"))
  logits_j = np.asarray(model.forward(params, jnp.asarray(batch["tokens"]), mcfg, lora=adapter,
                                      positions=jnp.asarray(batch["positions"]),
                                      segment_ids=jnp.asarray(batch["segment_ids"])))
  ref = logits_t.detach().numpy()[real]
  loss_j = float(train.mean_loss(adapter, params, train.add_loss_index(batch), mcfg))
  errors = {
      "logits": float(np.abs(logits_j[real] - ref).max() / np.abs(ref).max()),
      "loss": abs(loss_j - loss_t.item()) / abs(loss_t.item()),
      "lora_grad": max(float(np.linalg.norm(grads_j[k] - g) / max(np.linalg.norm(g), 1e-30))
                       for k, g in grads_t.items()),
  }
  return {"errors": errors, "loss_jax": loss_j, "loss_torch": loss_t.item(),
          "tokens": int(real.sum()), "ok": all(errors[k] <= TOLERANCES[k] for k in errors)}


def _grads(adapter, params, mcfg, batch):
  b = train.add_loss_index(batch)
  g = jax.grad(lambda a: train.mean_loss(a, params, b, mcfg))(adapter)
  return lora.Lora(g.weights, adapter.cfg)


def format_report(report: dict) -> str:
  lines = [f"batch: {report['tokens']} real tokens; loss jax {report['loss_jax']:.6f}, "
           f"torch {report['loss_torch']:.6f}", "| quantity | error | tolerance |", "|---|---|---|"]
  for k, v in report["errors"].items():
    lines.append(f"| {k} | {v:.2e} | {TOLERANCES[k]:.0e} |")
  lines.append("OK: within tolerance" if report["ok"] else "FAILED: error above tolerance")
  return "\n".join(lines)
