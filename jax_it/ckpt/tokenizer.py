"""Tokenizers stored with a checkpoint; the one built from GGUF metadata is cached on disk."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from jax_it.ckpt import CheckpointError


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
  """The transformers tokenizer of a local checkpoint: a .gguf file, an HF dir (or a folder of a
  saved tokenizer alone), or a Flax dir with tokenizer.model in it or beside it (cached per
  path)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  p = Path(path)
  if p.is_file():
    return gguf_tokenizer(p)
  if (p / "config.json").exists() or (p / "tokenizer_config.json").exists():
    return AutoTokenizer.from_pretrained(str(p))
  for spm in (p / "tokenizer.model", p.parent / "tokenizer.model"):
    if spm.exists():
      from transformers import GemmaTokenizer  # pylint: disable=g-import-not-at-top
      return GemmaTokenizer.from_pretrained(str(spm.parent))
  raise CheckpointError(f"{p}: no tokenizer found; expected an HF dir, a .gguf file, or a "
                        f"tokenizer.model beside the Flax checkpoint")


def gguf_tokenizer(p: Path):
  """Building a tokenizer from GGUF metadata takes ~30 s (262k entries); keep a saved copy
  keyed by the file's identity, so later runs load it in about a second."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  st = p.stat()
  key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
  root = Path(os.environ.get("JAX_IT_CACHE", Path.home() / ".cache" / "jax_it"))
  cache = root / "tokenizers" / key
  if (cache / "tokenizer_config.json").exists():
    try:
      return AutoTokenizer.from_pretrained(str(cache))
    except (OSError, ValueError):
      pass  # a damaged cache entry: rebuild it below
  tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
  try:
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    if not cache.exists():
      os.replace(tmp, cache)
  except OSError:
    pass  # no writable cache: the tokenizer is still returned
  return tok
