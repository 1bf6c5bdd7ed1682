"""GGUF (llama.cpp) files: a small parser of the format, and the reader into stacked params."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from jax_it.ckpt import CheckpointError
from jax_it.ckpt.stack import Stacker, copy_rows
from jax_it.families import FAMILIES, PROJECTIONS, Family, Projection, axis_sizes
from jax_it.model import ModelConfig, Params

# llama.cpp's values when a file leaves the key out
_DEFAULT_WINDOW = 4096
_DEFAULT_ROPE_BASE = 10_000.0

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}


def find(p: Path) -> Path | None:
  """p when it is a file with a .gguf name or the GGUF magic."""
  if not p.is_file():
    return None
  if p.suffix == ".gguf":
    return p
  with open(p, "rb") as f:
    return p if f.read(4) == b"GGUF" else None


class GGUFFile:
  """Minimal GGUF v2/v3 reader: metadata, tensor infos and a memmap of the data.

  gguf.GGUFReader turns every tokenizer string into numpy views (about 20 s for Gemma's 262k
  vocabulary); here string arrays are skipped, as the weights never need them.
  """

  def __init__(self, path: Path):
    import gguf  # pylint: disable=g-import-not-at-top
    self.mm = np.memmap(path, np.uint8, mode="r")
    self.buf, self.pos = memoryview(self.mm), 4  # after the magic
    if bytes(self.buf[:4]) != b"GGUF":
      raise ValueError("no GGUF magic")
    version = self._read("<I")
    if version < 2:
      raise ValueError(f"GGUF version {version} is too old; expected 2 or 3")
    n_tensors, n_kv = self._read("<Q"), self._read("<Q")
    self.fields = {}
    for _ in range(n_kv):
      key = self._str()
      self.fields[key] = self._value(self._read("<I"))
    infos = []
    for _ in range(n_tensors):
      name, ndim = self._str(), self._read("<I")
      dims = [self._read("<Q") for _ in range(ndim)]
      infos.append((name, dims, gguf.GGMLQuantizationType(self._read("<I")), self._read("<Q")))
    align = int(self.fields.get("general.alignment", 32))
    start = -(-self.pos // align) * align
    self.tensors = {}
    for name, dims, qtype, offset in infos:
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      row_bytes = dims[0] // block * size
      rows = int(np.prod(dims[1:], dtype=np.int64))
      begin = start + offset
      if begin + rows * row_bytes > len(self.mm):
        raise ValueError(f"tensor {name} ends past the end of the file (truncated?)")
      data = self.mm[begin:begin + rows * row_bytes].reshape(rows, row_bytes)
      self.tensors[name] = (tuple(reversed(dims)), qtype, data)

  def _read(self, fmt):
    size = struct.calcsize(fmt)
    (value,) = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += size
    return value

  def _str(self):
    n = self._read("<Q")
    self.pos += n
    if self.pos > len(self.buf):
      raise ValueError("metadata runs past the end of the file")
    return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", "replace")

  def _value(self, kind):
    if kind in _SCALARS:
      return self._read(_SCALARS[kind])
    if kind == 8:
      return self._str()
    if kind != 9:
      raise ValueError(f"unknown GGUF value type {kind}")
    elem, count = self._read("<I"), self._read("<Q")
    if elem == 8:  # string arrays (the vocabulary) are skipped, not decoded
      for _ in range(count):
        n = self._read("<Q")
        self.pos += n
      return None
    if elem not in _SCALARS:
      return [self._value(elem) for _ in range(count)]
    dt = np.dtype(_SCALARS[elem])
    out = np.frombuffer(self.buf, dt, count, self.pos)
    self.pos += dt.itemsize * count
    return out


def _family(arch, where: Path) -> Family:
  for fam in FAMILIES.values():
    if fam.gguf_arch == arch:
      return fam
  raise CheckpointError(f"{where}: GGUF architecture {arch!r} is not supported; "
                        f"expected one of {sorted(f.gguf_arch for f in FAMILIES.values())}")


def _config(fields: dict, vocab_rows: int, where: Path) -> ModelConfig:
  arch = fields.get("general.architecture")
  fam = _family(arch, where)
  get = lambda k, default=None: fields.get(f"{arch}.{k}", default)
  L, D, N = get("block_count"), get("embedding_length"), get("attention.head_count")
  H = get("attention.key_length", D // N)
  # llama.cpp hard-codes what the metadata lacks (the layer pattern, Gemma 3's local rope base,
  # the 27B models' query scale); the family table holds the same facts
  base = float(get("rope.freq_base", _DEFAULT_ROPE_BASE))
  scale = float(get("rope.scaling.factor", 1.0)) if get("rope.scaling.type") == "linear" else 1.0
  local = fam.local_layers(L)
  local_base = base if fam.rope_base_local is None else fam.rope_base_local
  return fam.config(
      L, D, get("feed_forward_length"), N, get("attention.head_count_kv", N), H,
      vocab_size=vocab_rows, query_pre_attn_scalar=fam.query_scalar(D, N, H, num_layers=L),
      attn_logits_soft_cap=get("attn_logit_softcapping"),
      final_logit_soft_cap=get("final_logit_softcapping"),
      sliding_window=get("attention.sliding_window", _DEFAULT_WINDOW) if any(local) else None,
      local_layers=local, rope_base_local=local_base, rope_base_global=base,
      rope_scale_global=scale,
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)))


def _block_roles(fam: Family) -> dict[str, Projection | str]:
  """Tensor role inside a block -> its projection, or the norm it holds (any family's norm:
  one this model lacks fails as "no place in this model")."""
  roles = {p.gguf: p for p in PROJECTIONS.values()}
  for f in (*FAMILIES.values(), fam):
    roles.update({role: norm for norm, role in f.gguf_norms.items()})
  return roles


def load(p: Path, dtype) -> tuple[Params, ModelConfig]:
  try:
    reader = GGUFFile(p)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from e
  if "token_embd.weight" not in reader.tensors:
    raise CheckpointError(f"{p}: GGUF file without token_embd.weight")
  cfg = _config(reader.fields, reader.tensors["token_embd.weight"][0][0], p)
  fam = FAMILIES[cfg.family]
  roles, sizes = _block_roles(fam), axis_sizes(cfg)
  stack = Stacker(cfg, dtype, p)
  for name, tensor in reader.tensors.items():
    _tensor(stack, name, tensor, roles, sizes, fam.gguf_norm_offset)
  return stack.finish(), cfg


def _tensor(stack, name, tensor, roles, sizes, norm_offset):
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
  shape, qtype, data = tensor
  read = lambda a, b: dequantize(data[a:b], qtype).reshape((b - a,) + shape[1:])
  if name == "token_embd.weight":
    copy_rows(stack, "embedder/input_embedding", name, shape, read)
  elif name == "output_norm.weight":
    stack.put("final_norm/scale", (), dequantize(data, qtype).reshape(shape) - norm_offset, name)
  elif (m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)) and m.group(2) in roles:
    full = dequantize(data, qtype).reshape(shape)
    stack.put_layer(roles[m.group(2)], int(m.group(1)), full, name, sizes, norm_offset)
  else:
    raise CheckpointError(f"{stack.source}: unexpected tensor {name} for a Gemma model")
