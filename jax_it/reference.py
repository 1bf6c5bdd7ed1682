"""The PyTorch reference (transformers + PEFT) of the tests, benchmarks and `run.py compare`."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from jax_it.families import FAMILIES

# Tiny enough for CPU tests in seconds; initializer_range 0.2 (not 0.02) so the layers move the
# logits well beyond float32 rounding. Eager attention: the reference implementation of Gemma.
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, initializer_range=0.2,
            attn_implementation="eager")

# Per family, every feature on and visible in a short sequence: soft-caps small enough to bite, a
# sliding window shorter than the test sequences, and for Gemma 3 enough layers (5 local, 1
# global) to reach a global layer with linear rope scaling as in Gemma 3 4B+.
FAMILY_DEFAULTS = {
    "gemma1": dict(num_hidden_layers=2),
    "gemma2": dict(num_hidden_layers=3, sliding_window=5, query_pre_attn_scalar=12,
                   attn_logit_softcapping=3.0, final_logit_softcapping=2.0),
    "gemma3": dict(num_hidden_layers=7, sliding_window=5, query_pre_attn_scalar=10,
                   rope_scaling={"rope_type": "linear", "factor": 8.0}),
}


def tiny_hf(family: str, *, seed: int = 0, norm_std: float = 0.5, weight_std: float | None = None,
            embed_std: float | None = None, save_to=None, **overrides):
  """A tiny random eval-mode transformers Gemma 1/2/3 ("gemma1" | "gemma2" | "gemma3").

  The config is TINY, then FAMILY_DEFAULTS[family], then `overrides` (any config keyword;
  attn_implementation=None leaves transformers' choice). After transformers' init under
  torch.manual_seed(seed), every norm weight is redrawn from N(0, norm_std): transformers
  initialises them to zero (scale 1), which would hide a misread norm. With weight_std every
  other weight is redrawn too, from N(0, weight_std) (N(0, embed_std) for the embedding when
  given), in one pass in parameter order. save_to: a folder to save_pretrained the model into.
  """
  import transformers

  fam = FAMILIES[family]  # its transformers model_type and class
  config = transformers.AutoConfig.for_model(fam.hf_types[0],
                                             **{**TINY, **FAMILY_DEFAULTS[family], **overrides})
  model_cls = getattr(transformers, fam.hf_class)
  torch.manual_seed(seed)
  hf = model_cls(config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.normal_(0.0, norm_std)
      elif weight_std is not None:
        p.normal_(0.0, embed_std if embed_std is not None and "embed" in name else weight_std)
  if save_to is not None:
    hf.save_pretrained(save_to)
  return hf


def torch_model(path, params=None, mcfg=None, tmp=None):
  """The float32 eager transformers model of a checkpoint.

  A GGUF file goes through transformers' own GGUF reader and an HF folder is read as saved, so
  the reference shares no reader with us; anything else (random presets, Flax, orbax) is an HF
  export of our `params` (ModelConfig `mcfg`) written under `tmp` (a temporary folder if None).
  """
  from transformers import AutoModelForCausalLM

  path = os.fspath(path)
  kw = dict(attn_implementation="eager", dtype="float32")
  if os.path.isfile(path) and path.endswith(".gguf"):
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                gguf_file=os.path.basename(path), **kw).eval()
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()
  if params is None or mcfg is None:
    raise ValueError(f"{path}: not a GGUF file or an HF folder; pass params and mcfg to export")
  if tmp is None:
    # removing the folder after loading is safe: the model holds its tensors (or, where
    # safetensors memory-maps them, Linux keeps an unlinked file's pages while they are mapped)
    with tempfile.TemporaryDirectory() as tmp:
      return torch_model(path, params, mcfg, tmp)
  out = os.path.join(tmp, "hf")
  from jax_it.ckpt.hf import save_hf
  save_hf(params, mcfg, out)
  return AutoModelForCausalLM.from_pretrained(out, **kw).eval()


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


def peft_dora_model(hf, targets, r=4, alpha=8.0, seed=1, std=0.1, magnitude_std=0.1,
                    dropout=0.0):
  """Wrap hf in a PEFT DoRA (use_dora=True) with random A and B and each magnitude scaled by
  1 + N(0, magnitude_std): with B nonzero, DoRA differs from plain LoRA and from the base."""
  import peft

  config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True,
                           target_modules=list(targets), task_type="CAUSAL_LM")
  model = peft.get_peft_model(hf, config)  # magnitudes = ||W|| per output feature (B is zero)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1.0 + torch.randn(p.shape, generator=g) * magnitude_std)
      elif "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=g) * std)
  return model


def adapter_grads(model) -> dict[str, np.ndarray]:
  """PEFT adapter gradients keyed exactly as in a saved adapter file: like lora_grads, and DoRA's
  magnitudes under their saved key (".lora_magnitude_vector", no ".weight")."""
  out = {}
  for name, g in lora_grads(model).items():
    out[name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight")
        else name] = g
  return out


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
