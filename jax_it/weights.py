"""Checkpoints -> (params, ModelConfig) and back: the public entry point over jax_it/ckpt/.

Formats are one module each in jax_it/ckpt (gguf, hf, flax); `load` asks each in turn whether a
path is of its format. Every reader streams: it builds the ModelConfig from metadata and shapes
first (family facts from families.FAMILIES), preallocates the stacked in-memory layout of
`model.py` in the target dtype, then copies one source tensor at a time into it (the embedding
in row chunks), so no second full copy of the weights ever exists.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp

from jax_it.ckpt import CheckpointError, flax, gguf, hf, tokenizer
from jax_it.ckpt.flax import META_FILE
from jax_it.ckpt.hf import hf_config_to_model
from jax_it.model import ModelConfig, Params

__all__ = ["CheckpointError", "META_FILE", "hf_config_to_model", "load", "load_tokenizer", "save"]

# Tried in order: each has find(path) -> the checkpoint path or None, and load(path, dtype).
_FORMATS = (gguf, hf, flax)


def load(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Params, ModelConfig]:
  """Load a Flax/orbax dir, HF safetensors dir, .gguf file or hub id -> (params, cfg)."""
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
  p = _resolve(path)
  for fmt in _FORMATS:
    found = fmt.find(p)
    if found is not None:
      return fmt.load(found, dtype)
  if p.is_file():
    raise CheckpointError(f"{p}: not a GGUF file; expected a .gguf file or a checkpoint directory")
  raise CheckpointError(f"{p}: not a checkpoint; expected config.json + *.safetensors, an orbax "
                        "checkpoint or a .gguf")


def save(params: Params, cfg: ModelConfig, path: str | os.PathLike) -> None:
  """Save as an orbax checkpoint in the official flat Flax layout, plus jax_it.json."""
  flax.save(params, cfg, Path(path))


def load_tokenizer(path: str | os.PathLike):
  """The transformers tokenizer stored with a checkpoint (cached per path)."""
  return tokenizer.load_tokenizer(str(_resolve(path).absolute()))


def _resolve(path) -> Path:
  """A local path, or the snapshot of a hub id (owner/name) downloaded into the HF cache."""
  p = Path(path).expanduser()
  if p.exists():
    return p
  s = str(path)
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", s):
    raise CheckpointError(f"{s}: no such file or directory (and not a hub id like owner/name)")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    local = snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).splitlines()[0] if str(e) else ""
    raise CheckpointError(f"{s}: not a local path and the hub download failed "
                          f"({type(e).__name__}: {first})") from e
  return Path(local)
