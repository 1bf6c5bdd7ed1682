"""PEFT LoRA adapter directories: our adapter pytree written and read as peft.PeftModel does."""

from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np

from jax_it.families import PROJECTIONS
from jax_it.lora import Lora, LoraConfig, io_shapes
from jax_it.model import ModelConfig

_PEFT_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _peft_name(target: str, layer: int, which: str) -> str:
  return f"base_model.model.model.layers.{layer}.{PROJECTIONS[target].hf}.lora_{which}.weight"


def save_peft(adapter: Lora, cfg: ModelConfig, out_dir: str, base_model: str | None = None):
  """Write adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel."""
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  lc = adapter.cfg
  tensors = {}
  for target in lc.targets:
    ins, outs = io_shapes(target, cfg)
    a = np.asarray(adapter.weights[target]["a"], np.float32)
    b = np.asarray(adapter.weights[target]["b"], np.float32)
    for layer in range(cfg.num_layers):
      # PEFT: lora_A.weight [r, in], lora_B.weight [out, r], with flattened (head, dim) axes
      tensors[_peft_name(target, layer, "A")] = np.ascontiguousarray(
          a[layer].reshape(math.prod(ins), lc.r).T)
      tensors[_peft_name(target, layer, "B")] = np.ascontiguousarray(
          b[layer].reshape(lc.r, math.prod(outs)).T)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": lc.r, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
      "target_modules": list(lc.targets), "use_rslora": lc.rslora, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "modules_to_save": None, "layers_to_transform": None, "use_dora": False,
  }
  _atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                lambda p: save_file(tensors, p, metadata={"format": "pt"}))
  _atomic_write(os.path.join(out_dir, "adapter_config.json"),
                lambda p: open(p, "w").write(json.dumps(config, indent=2)))


def _atomic_write(path: str, write):
  """Write to a temporary name, then rename, so a crash never leaves a half-written file."""
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def _read_peft_config(adapter_dir: str) -> LoraConfig:
  path = os.path.join(adapter_dir, "adapter_config.json")
  if not os.path.exists(path):
    raise ValueError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
  with open(path) as f:
    pc = json.load(f)
  if pc.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{path}: peft_type {pc.get('peft_type')!r} is not supported; expected LORA")
  for key in ("use_dora", "layers_to_transform", "rank_pattern", "alpha_pattern",
              "modules_to_save"):
    if pc.get(key):
      raise ValueError(f"{path}: {key}={pc[key]!r} is not supported")
  if pc.get("bias", "none") != "none":
    raise ValueError(f"{path}: bias={pc['bias']!r} is not supported; expected 'none'")
  targets = pc["target_modules"]
  if isinstance(targets, str) and targets != "all-linear":
    raise ValueError(f"{path}: target_modules regex {targets!r} is not supported; give a list")
  return LoraConfig(r=int(pc["r"]), alpha=float(pc["lora_alpha"]),
                    dropout=float(pc.get("lora_dropout", 0.0)),
                    targets=tuple(targets) if isinstance(targets, list) else targets,
                    rslora=bool(pc.get("use_rslora", False)))


def load_peft(adapter_dir: str, cfg: ModelConfig, dtype=jnp.float32) -> Lora:
  """Read a PEFT LoRA adapter directory into the LoRA pytree."""
  from safetensors import safe_open

  lc = _read_peft_config(adapter_dir)
  path = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.exists(path):
    raise ValueError(f"{adapter_dir}: adapter_model.safetensors is missing")
  arrays = {t: {"a": [None] * cfg.num_layers, "b": [None] * cfg.num_layers} for t in lc.targets}
  with safe_open(path, framework="np") as f:
    for key in f.keys():
      m = _PEFT_KEY.search(key)
      if not m or m.group(3) not in arrays:
        raise ValueError(f"{path}: unexpected tensor {key!r} for targets {list(lc.targets)}")
      layer, target, which = int(m.group(1)), m.group(3), m.group(4)
      if layer >= cfg.num_layers:
        raise ValueError(f"{path}: tensor {key!r} is for layer {layer}; the model has "
                         f"{cfg.num_layers}")
      ins, outs = io_shapes(target, cfg)
      t = f.get_tensor(key).astype(np.float32)
      want = (lc.r, math.prod(ins)) if which == "A" else (math.prod(outs), lc.r)
      if t.shape != want:
        raise ValueError(f"{path}: {key} has shape {t.shape}, expected {want}")
      shaped = t.T.reshape(*ins, lc.r) if which == "A" else t.T.reshape(lc.r, *outs)
      arrays[target]["a" if which == "A" else "b"][layer] = shaped
  weights = {}
  for target, ab in arrays.items():
    missing = [i for i, x in enumerate(ab["a"] + ab["b"]) if x is None]
    if missing:
      raise ValueError(f"{path}: {target} is missing tensors for some layers")
    weights[target] = {k: jnp.asarray(np.stack(v), dtype) for k, v in ab.items()}
  return Lora(weights, lc)
