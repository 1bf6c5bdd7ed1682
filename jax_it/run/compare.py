"""`run.py compare`: our model and LoRA gradients against transformers + PEFT on one batch."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jax_it import config, data, lora, model, train
from jax_it.run import setup

TOLERANCES = {"logits": 1e-4, "loss": 1e-5, "lora_grad": 1e-4}


def float32_config(cfg: config.RunConfig) -> config.RunConfig:
  """The run's config with the model in float32, float matmuls and no quantization: the
  comparison's terms, so the model is loaded once, as the comparison needs it."""
  m = dataclasses.replace(cfg.model, dtype="float32", matmul="params", quant="none")
  return dataclasses.replace(cfg, model=m)


def _batch(ctx: setup.Context, rows: int = 2) -> dict:
  records = ctx.splits["validation"] or ctx.splits["test"] or ctx.splits["train"]
  dcfg = dataclasses.replace(ctx.cfg.data, max_len=min(ctx.cfg.data.max_len, 256))
  # the same whole batch on every process: in a multi-process run each compares redundantly
  return next(iter(data.eval_batches(records[:rows], ctx.tokenizer, dcfg, rows,
                                     process_index=0, process_count=1)))


def _comparable(ctx: setup.Context, adapter) -> lora.Lora:
  """The adapter in float32 without dropout; a random one (nonzero B) when there is no run yet."""
  if adapter is None:
    adapter = lora.init(jax.random.key(0), ctx.mcfg, ctx.cfg.lora, params=ctx.params)
    adapter = adapter.replace(weights=jax.tree.map(
        lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), adapter.weights))
  adapter = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapter)
  return lora.Lora(adapter.weights, dataclasses.replace(adapter.cfg, dropout=0.0))


def against_torch(ctx: setup.Context, adapter) -> dict:
  """Errors of logits (real tokens), loss and every LoRA gradient, in float32 on both sides.

  `ctx` must hold the float32 model (see float32_config).
  """
  import peft
  import torch

  from jax_it import reference

  params, mcfg = ctx.params, ctx.mcfg
  adapter = _comparable(ctx, adapter)
  batch = _batch(ctx)
  real = np.asarray(batch["segment_ids"]) > 0
  with tempfile.TemporaryDirectory() as tmp:
    hf = reference.torch_model(setup.checkpoint_path(ctx.cfg.model), params, mcfg, tmp)
    lora.save_peft(adapter, mcfg, os.path.join(tmp, "adapter"))
    pm = peft.PeftModel.from_pretrained(hf, os.path.join(tmp, "adapter"), is_trainable=True)
    logits_t = pm(torch.as_tensor(batch["tokens"], dtype=torch.long),
                  attention_mask=torch.as_tensor(real, dtype=torch.long)).logits
    loss_t = reference.masked_nll(logits_t, batch["targets"], batch["loss_mask"])
    loss_t.backward()
    grads_t = reference.adapter_grads(pm)
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
      "lora_grad": max(reference.norm_rel_err(grads_j[k], g) for k, g in grads_t.items()),
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
