"""The PyTorch reference side of the numerics tests: tiny transformers models and PEFT adapters."""

from __future__ import annotations

import numpy as np
import torch


def tiny_gemma2(tmp_dir, seed=0, vocab=256, layers=2, window=8):
  """A tiny random transformers Gemma 2 (softcaps on, sliding window) saved to tmp_dir."""
  import transformers

  torch.manual_seed(seed)
  config = transformers.Gemma2Config(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
      sliding_window=window, attn_implementation="eager")
  hf = transformers.Gemma2ForCausalLM(config).eval()
  _randomize_norms(hf)
  hf.save_pretrained(tmp_dir)
  return hf


def _randomize_norms(hf):
  # transformers initialises norm weights to zero (i.e. scale 1); make them matter.
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.normal_(0.0, 0.3)


def peft_model(hf, targets, r=4, alpha=8.0, seed=1, std=0.1, dropout=0.0):
  """Wrap hf in a PEFT LoRA with nonzero random A and B (B is zero after PEFT's own init)."""
  import peft

  config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                           target_modules=list(targets), task_type="CAUSAL_LM")
  model = peft.get_peft_model(hf, config)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=g) * std)
  return model


def masked_nll(logits: torch.Tensor, targets: np.ndarray, mask: np.ndarray) -> torch.Tensor:
  """Mean next-token NLL over the positions where mask is on (the reference's loss)."""
  # float64: the backward of a float32 log_softmax over a 262k vocabulary (exp of a rounded
  # log-prob) errs by ~1e-6 per probability, which alone moves the real Gemma 3 270M's q_proj
  # LoRA gradients by ~2.5e-4; in float64 the reference is ~1e-5 from a true float64 run.
  logp = torch.log_softmax(logits.double(), dim=-1)
  t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
  m = torch.as_tensor(np.asarray(mask), dtype=torch.float64)
  nll = -logp.gather(-1, t[..., None])[..., 0]
  return (nll * m).sum() / m.sum()


def lora_grads(model) -> dict[str, np.ndarray]:
  """PEFT LoRA gradients keyed as in a saved adapter file."""
  return {name.replace(".default", ""): p.grad.detach().numpy().copy()
          for name, p in model.named_parameters() if "lora_" in name and p.grad is not None}


def rel_err(x, ref) -> float:
  """max |x - ref| / max |ref|."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(x - ref).max() / np.abs(ref).max())


def norm_rel_err(x, ref) -> float:
  """||x - ref|| / ||ref||."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def random_batch(rng: np.random.Generator, batch: int, length: int, vocab: int,
                 mask_share: float = 0.6) -> dict:
  """A batch of random tokens with a random loss mask (always at least one loss position)."""
  tokens = rng.integers(3, vocab, (batch, length + 1))
  mask = rng.random((batch, length)) < mask_share
  mask[:, -1] = True
  return {"tokens": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
          "segment_ids": np.ones((batch, length), np.int32), "loss_mask": mask}
