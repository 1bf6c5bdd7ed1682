"""Checkpoint readers and writers: Flax/orbax, HF safetensors and GGUF -> (params, ModelConfig).

Every reader streams: it builds the ModelConfig from metadata and shapes first, preallocates the
stacked in-memory layout of `model.py` in the target dtype, then copies one source tensor at a time
into it (the embedding in row chunks), so no second full copy of the weights ever exists.

Our own Flax saves carry a `jax_it.json` beside the orbax files: the ModelConfig fields, which
settle what shapes alone cannot (Gemma 3 27B's query scale, gating layout when D == F, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jax_it import model
from jax_it.model import ModelConfig, Params

META_FILE = "jax_it.json"
_CHUNK_BYTES = 1 << 26  # big tensors are copied in row chunks of about 64 MiB
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


class CheckpointError(ValueError):
  """A checkpoint that is missing, truncated, or fits no Gemma family."""


# ---------------------------------------------------------------------------------------------
# Public API


def load(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Params, ModelConfig]:
  """Load a Flax/orbax dir, HF safetensors dir, .gguf file or hub id -> (params, cfg)."""
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
  p = _resolve(path)
  if p.is_file():
    if p.suffix != ".gguf" and not _is_gguf(p):
      raise CheckpointError(f"{p}: not a GGUF file; expected a .gguf file or a checkpoint directory")
    return _load_gguf(p, dtype)
  if (p / "config.json").exists():
    return _load_hf(p, dtype)
  flax_dir = _find_orbax_dir(p)
  if flax_dir is not None:
    return _load_flax(flax_dir, dtype)
  raise CheckpointError(
      f"{p}: not a checkpoint; expected config.json + *.safetensors, an orbax checkpoint or a .gguf")


def save(params: Params, cfg: ModelConfig, path: str | os.PathLike) -> None:
  """Save as an orbax checkpoint in the official flat Flax layout, plus jax_it.json."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = Path(path).absolute()
  ocp.PyTreeCheckpointer().save(path, _to_flax_tree(params, cfg), force=True)
  (path / META_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


def load_tokenizer(path: str | os.PathLike):
  """The transformers tokenizer stored with a checkpoint (cached per path)."""
  return _load_tokenizer(str(_resolve(path).absolute()))


# ---------------------------------------------------------------------------------------------
# Locating the checkpoint


def _resolve(path) -> Path:
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
    raise CheckpointError(f"{s}: not a local path and the hub download failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
  return Path(local)


def _is_gguf(p: Path) -> bool:
  with open(p, "rb") as f:
    return f.read(4) == b"GGUF"


def _find_orbax_dir(p: Path) -> Path | None:
  """The orbax checkpoint in p, or in its only subdirectory (Kaggle puts one beside tokenizer.model)."""
  if not p.is_dir():
    return None
  if any((p / m).exists() for m in _ORBAX_MARKERS):
    return p
  subdirs = [d for d in p.iterdir() if d.is_dir()]
  if len(subdirs) == 1 and any((subdirs[0] / m).exists() for m in _ORBAX_MARKERS):
    return subdirs[0]
  return None


# ---------------------------------------------------------------------------------------------
# The stacked destination


def _aligned_empty(shape, dtype) -> np.ndarray:
  """Uninitialised array on a 64-byte boundary, so jax.device_put can alias it, not copy it."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  buf = np.empty(nbytes + 64, np.uint8)
  start = -buf.ctypes.data % 64
  return buf[start:start + nbytes].view(dtype).reshape(shape)


class _Stacker:
  """Preallocated stacked params, filled one source tensor (or row chunk) at a time."""

  def __init__(self, cfg: ModelConfig, dtype, source: Path):
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg, dtype))
    self.flat = {k: _aligned_empty(s.shape, dtype)
                 for k, s in traverse_util.flatten_dict(shapes, sep="/").items()}
    self.written = dict.fromkeys(self.flat, 0)
    self.source = source

  def put(self, key: str, index: tuple, value: np.ndarray, name: str, rows: int | None = None):
    """Write `value` at flat[key][index] (or at rows `rows:` of it when copying in chunks)."""
    if key not in self.flat:
      raise CheckpointError(f"{self.source}: tensor {name} has no place in this model ({key})")
    dst = self.flat[key][index]
    if rows is not None:
      dst = dst[rows:rows + value.shape[0]]
    if dst.shape != value.shape:
      raise CheckpointError(f"{self.source}: tensor {name} has shape {tuple(value.shape)}, "
                            f"expected {dst.shape} for {key}")
    dst[...] = value
    self.written[key] += value.size

  def finish(self) -> Params:
    missing = [k for k, a in self.flat.items() if self.written[k] < a.size]
    if missing:
      raise CheckpointError(f"{self.source}: missing tensors for {', '.join(missing)}")
    flat = {k: jax.device_put(self.flat.pop(k), may_alias=True) for k in list(self.flat)}
    return traverse_util.unflatten_dict(flat, sep="/")


def _copy_rows(stack, key, name, shape, read_rows: Callable[[int, int], np.ndarray], fix=None):
  """Copy a 2-D tensor in row chunks; `read_rows(a, b)` returns rows a:b as floats."""
  step = max(1, _CHUNK_BYTES // (4 * int(np.prod(shape[1:]))))
  for a in range(0, shape[0], step):
    rows = read_rows(a, min(a + step, shape[0]))
    stack.put(key, (), rows if fix is None else fix(rows), name, rows=a)


# Conversions from the HF/GGUF [out, in] matrices to the Flax layout (H = head dim).
def _heads_in(w, H):  # [X*H, D] -> [X, D, H]
  return w.reshape(-1, H, w.shape[-1]).transpose(0, 2, 1)


def _heads_out(w, H):  # [D, N*H] -> [N, H, D]
  return w.reshape(w.shape[0], -1, H).transpose(1, 2, 0)


def _t(w, H):
  del H
  return w.T


def _minus_one(w, H):
  del H
  return w - 1.0


def _same(w, H):
  del H
  return w


# One rule per weight inside a layer: (stacked key, index inside the layer, conversion).
_ATTN_RULES = {
    "q": ("layers/attn/q_einsum/w", (), _heads_in),
    "k": ("layers/attn/kv_einsum/w", (0,), _heads_in),
    "v": ("layers/attn/kv_einsum/w", (1,), _heads_in),
    "o": ("layers/attn/attn_vec_einsum/w", (), _heads_out),
    "gate": ("layers/mlp/gating_einsum/w", (0,), _t),
    "up": ("layers/mlp/gating_einsum/w", (1,), _t),
    "down": ("layers/mlp/linear/w", (), _t),
}
_NORMS = {"pre_attn": "pre_attention_norm", "post_attn": "post_attention_norm",
          "pre_ffw": "pre_ffw_norm", "post_ffw": "post_ffw_norm",
          "q_norm": "attn/_query_norm", "k_norm": "attn/_key_norm"}


def _layer_rule(role: str, norm_fix):
  if role in _ATTN_RULES:
    return _ATTN_RULES[role]
  return f"layers/{_NORMS[role]}/scale", (), norm_fix


# ---------------------------------------------------------------------------------------------
# Hugging Face safetensors


_HF_FAMILY = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
# transformers' class defaults, for config.json files (e.g. Gemma 3 text_config) that omit keys
_HF_DEFAULTS = {
    "gemma1": dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                   num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                   rope_theta=10_000.0, sliding_window=None),
    "gemma2": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   query_pre_attn_scalar=256, rope_theta=10_000.0, sliding_window=4096,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   query_pre_attn_scalar=256, rope_theta=1_000_000.0,
                   rope_local_base_freq=10_000.0, sliding_window=4096, sliding_window_pattern=6),
}
_NULLABLE = ("attn_logit_softcapping", "final_logit_softcapping", "rope_scaling")
_HF_ROLES = {
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o", "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm", "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up", "mlp.down_proj.weight": "down",
    "input_layernorm.weight": "pre_attn", "pre_feedforward_layernorm.weight": "pre_ffw",
    "post_feedforward_layernorm.weight": "post_ffw",
}


def _rope_entry(entry: dict, where: str, default_theta: float) -> tuple[float, float]:
  kind = entry.get("rope_type", entry.get("type", "default"))
  if kind not in ("default", "linear"):
    raise CheckpointError(f"{where}: rope type {kind!r} is not supported; expected default or linear")
  return float(entry.get("rope_theta", default_theta)), float(entry.get("factor", 1.0))


def _hf_rope(d: dict, family: str, where: str) -> tuple[float, float, float]:
  """(local base, global base, global scale) from rope_parameters or the older flat keys."""
  rp = d.get("rope_parameters")
  if rp and "full_attention" in rp:
    glob = _rope_entry(rp["full_attention"], where, d["rope_theta"])
    local = _rope_entry(rp.get("sliding_attention", {}), where, d.get("rope_local_base_freq",
                                                                      glob[0]))
  elif rp:
    glob = local = _rope_entry(rp, where, d["rope_theta"])
  else:
    glob = _rope_entry(d.get("rope_scaling") or {}, where, d["rope_theta"])
    local = (float(d.get("rope_local_base_freq", glob[0])), 1.0)
  if family != "gemma3":
    local = glob
  if local[1] != 1.0:
    raise CheckpointError(f"{where}: rope scaling on sliding-window layers is not supported")
  return local[0], glob[0], glob[1]


def hf_config_to_model(d: dict, vocab_rows: int, where: str = "config.json") -> ModelConfig:
  """Map a transformers Gemma config dict (gemma / gemma2 / gemma3_text / gemma3) to ModelConfig."""
  if d.get("model_type") == "gemma3" and "text_config" in d:
    d = {"model_type": "gemma3_text", **d["text_config"]}
  family = _HF_FAMILY.get(d.get("model_type"))
  if family is None:
    raise CheckpointError(f"{where}: model_type {d.get('model_type')!r} is not a Gemma text model; "
                          f"expected one of {sorted(_HF_FAMILY)}")
  # an explicit null soft cap means "off"; any other null means "the class default"
  d = {**_HF_DEFAULTS[family], **{k: v for k, v in d.items() if v is not None or k in _NULLABLE}}
  L = d["num_hidden_layers"]
  if "layer_types" in d and d["layer_types"]:
    local = tuple(t == "sliding_attention" for t in d["layer_types"])
  elif family == "gemma1":
    local = (False,) * L
  else:
    period = 2 if family == "gemma2" else d.get("sliding_window_pattern",
                                                 d.get("_sliding_window_pattern", 6))
    local = model.layer_pattern(L, period)
  base_local, base_global, scale = _hf_rope(d, family, where)
  H = d["head_dim"]
  D = d["hidden_size"]
  return ModelConfig(
      family=family, num_layers=L, vocab_size=vocab_rows, embed_dim=D,
      hidden_dim=d["intermediate_size"], num_heads=d["num_attention_heads"],
      num_kv_heads=d["num_key_value_heads"], head_dim=H,
      query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", H)),
      attn_logits_soft_cap=d.get("attn_logit_softcapping"),
      final_logit_soft_cap=d.get("final_logit_softcapping"),
      sliding_window=d.get("sliding_window") if any(local) else None, local_layers=local,
      rope_base_local=base_local, rope_base_global=base_global, rope_scale_global=scale,
      use_post_norms=family != "gemma1", use_qk_norm=family == "gemma3",
      norm_eps=float(d.get("rms_norm_eps", 1e-6)), transposed_gating=_official_transposed(family, D))


def _official_transposed(family: str, embed_dim: int) -> bool:
  """Whether the official Flax checkpoint of this model stores gating as [2, F, D]."""
  return family == "gemma3" or (family == "gemma2" and embed_dim > 2304)


def _hf_files(p: Path) -> list[Path]:
  index = p / "model.safetensors.index.json"
  if index.exists():
    try:
      names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e})") from e
    return [p / n for n in names]
  if (p / "model.safetensors").exists():
    return [p / "model.safetensors"]
  raise CheckpointError(f"{p}: config.json without model.safetensors or model.safetensors.index.json")


def _safe_open(f: Path):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if not f.exists():
    raise CheckpointError(f"{f}: missing safetensors shard")
  try:
    return safe_open(str(f), framework="numpy")
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e


def _load_hf(p: Path, dtype) -> tuple[Params, ModelConfig]:
  try:
    conf = json.loads((p / "config.json").read_text())
  except ValueError as e:
    raise CheckpointError(f"{p / 'config.json'}: not valid JSON ({e})") from e
  files = _hf_files(p)
  handles = [_safe_open(f) for f in files]
  embed = [(h, k) for h in handles for k in h.keys() if k.endswith("embed_tokens.weight")]
  if len(embed) != 1:
    raise CheckpointError(f"{p}: expected one embed_tokens.weight tensor, found {len(embed)}")
  prefix = embed[0][1][:-len("embed_tokens.weight")]
  vocab_rows = embed[0][0].get_slice(embed[0][1]).get_shape()[0]
  cfg = hf_config_to_model(conf, vocab_rows, str(p / "config.json"))
  roles = dict(_HF_ROLES)
  roles["post_attention_layernorm.weight"] = "pre_ffw" if cfg.family == "gemma1" else "post_attn"
  stack = _Stacker(cfg, dtype, p)
  layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.+)")
  for f, h in zip(files, handles):
    try:
      for name in h.keys():
        _hf_tensor(stack, h, name, prefix, layer_re, roles, cfg)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{f}: unreadable safetensors data ({e})") from e
  return stack.finish(), cfg


def _hf_tensor(stack, h, name, prefix, layer_re, roles, cfg):
  f32 = lambda x: np.asarray(x, np.float32)
  if name == prefix + "embed_tokens.weight":
    sl = h.get_slice(name)
    _copy_rows(stack, "embedder/input_embedding", name, sl.get_shape(), lambda a, b: sl[a:b])
  elif name == prefix + "norm.weight":
    stack.put("final_norm/scale", (), f32(h.get_tensor(name)), name)
  elif m := layer_re.fullmatch(name):
    role = roles.get(m.group(2))
    if role is not None:  # e.g. rotary inv_freq buffers of old checkpoints are skipped
      key, sub, conv = _layer_rule(role, _same)
      stack.put(key, (int(m.group(1)),) + sub, conv(f32(h.get_tensor(name)), cfg.head_dim), name)


# ---------------------------------------------------------------------------------------------
# GGUF


_GGUF_FAMILY = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3": "gemma3"}
_GGUF_ROLES = {
    "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
    "attn_norm": "pre_attn", "post_attention_norm": "post_attn", "ffn_norm": "pre_ffw",
    "post_ffw_norm": "post_ffw",
}


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


class _GGUF:
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
    if kind in _GGUF_SCALARS:
      return self._read(_GGUF_SCALARS[kind])
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
    if elem not in _GGUF_SCALARS:
      return [self._value(elem) for _ in range(count)]
    dt = np.dtype(_GGUF_SCALARS[elem])
    out = np.frombuffer(self.buf, dt, count, self.pos)
    self.pos += dt.itemsize * count
    return out


def _gguf_config(fields: dict, vocab_rows: int, where: Path) -> ModelConfig:
  arch = fields.get("general.architecture")
  family = _GGUF_FAMILY.get(arch)
  if family is None:
    raise CheckpointError(f"{where}: GGUF architecture {arch!r} is not supported; "
                          f"expected one of {sorted(_GGUF_FAMILY)}")
  get = lambda k, default=None: fields.get(f"{arch}.{k}", default)
  L, D, N = get("block_count"), get("embedding_length"), get("attention.head_count")
  H = get("attention.key_length", D // N)
  # llama.cpp hard-codes what the metadata lacks: the layer patterns, Gemma 3's local rope base,
  # and the 27B models' query scale of D / N.
  scalar = D // N if (family, L) in (("gemma2", 46), ("gemma3", 62)) else H
  base = float(get("rope.freq_base", 10_000.0))
  scale = float(get("rope.scaling.factor", 1.0)) if get("rope.scaling.type") == "linear" else 1.0
  local = {"gemma1": (False,) * L, "gemma2": model.layer_pattern(L, 2),
           "gemma3": model.layer_pattern(L, 6)}[family]
  return ModelConfig(
      family=family, num_layers=L, vocab_size=vocab_rows, embed_dim=D,
      hidden_dim=get("feed_forward_length"), num_heads=N,
      num_kv_heads=get("attention.head_count_kv", N), head_dim=H, query_pre_attn_scalar=scalar,
      attn_logits_soft_cap=get("attn_logit_softcapping"),
      final_logit_soft_cap=get("final_logit_softcapping"),
      sliding_window=get("attention.sliding_window", 4096) if any(local) else None,
      local_layers=local, rope_base_local=10_000.0 if family == "gemma3" else base,
      rope_base_global=base, rope_scale_global=scale, use_post_norms=family != "gemma1",
      use_qk_norm=family == "gemma3",
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      transposed_gating=_official_transposed(family, D))


def _load_gguf(p: Path, dtype) -> tuple[Params, ModelConfig]:
  try:
    reader = _GGUF(p)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from e
  if "token_embd.weight" not in reader.tensors:
    raise CheckpointError(f"{p}: GGUF file without token_embd.weight")
  cfg = _gguf_config(reader.fields, reader.tensors["token_embd.weight"][0][0], p)
  stack = _Stacker(cfg, dtype, p)
  for name, tensor in reader.tensors.items():
    _gguf_tensor(stack, name, tensor, cfg)
  return stack.finish(), cfg


def _gguf_tensor(stack, name, tensor, cfg):
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
  shape, qtype, data = tensor
  read = lambda a, b: dequantize(data[a:b], qtype).reshape((b - a,) + shape[1:])
  if name == "token_embd.weight":
    _copy_rows(stack, "embedder/input_embedding", name, shape, read)
  elif name == "output_norm.weight":
    stack.put("final_norm/scale", (), dequantize(data, qtype).reshape(shape) - 1.0, name)
  elif m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name):
    role = _GGUF_ROLES.get(m.group(2))
    if role is None:
      raise CheckpointError(f"{stack.source}: unexpected tensor {name} for a Gemma model")
    key, sub, conv = _layer_rule(role, _minus_one)
    full = dequantize(data, qtype).reshape(shape)
    stack.put(key, (int(m.group(1)),) + sub, conv(full, cfg.head_dim), name)
  else:
    raise CheckpointError(f"{stack.source}: unexpected tensor {name} for a Gemma model")


# ---------------------------------------------------------------------------------------------
# Flax / orbax (official Gemma layout)


def _strip(key: str) -> str:
  for prefix in ("params/", "transformer/"):
    key = key.removeprefix(prefix)
  return key


def _flax_config(shapes: dict[str, tuple], meta: dict | None, where: Path) -> ModelConfig:
  """Config from the checkpoint's shapes plus family (from jax_it.json when our saver wrote one)."""
  try:
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"layer_(\d+)/", k))}
    V, D = shapes["embedder/input_embedding"]
    if "layer_0/attn/qkv_einsum/w" in shapes:
      _, N, _, H = shapes["layer_0/attn/qkv_einsum/w"]
      K = N
    else:
      N, _, H = shapes["layer_0/attn/q_einsum/w"]
      K = shapes["layer_0/attn/kv_einsum/w"][1]
    F = shapes["layer_0/mlp/linear/w"][0]
    gating = shapes["layer_0/mlp/gating_einsum/w"]
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{where}: shapes fit no Gemma family (missing or odd {e})") from e
  if layers != set(range(len(layers))) or gating not in ((2, D, F), (2, F, D)):
    raise CheckpointError(f"{where}: shapes fit no Gemma family (layers {sorted(layers)[:4]}..., "
                          f"gating {gating} for D={D}, F={F})")
  if meta is not None:
    cfg = ModelConfig(**{**meta, "local_layers": tuple(meta["local_layers"])})
    dims = (len(layers), V, D, F, N, K, H)
    if dims != (cfg.num_layers, cfg.vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads,
                cfg.num_kv_heads, cfg.head_dim):
      raise CheckpointError(f"{where}: {META_FILE} does not match the checkpoint's shapes {dims}")
    return cfg
  family = ("gemma3" if "layer_0/attn/_query_norm/scale" in shapes else
            "gemma2" if "layer_0/post_attention_norm/scale" in shapes else "gemma1")
  transposed = _official_transposed(family, D) if D == F else gating == (2, F, D)
  L = len(layers)
  if family == "gemma1":
    cfg = ModelConfig("gemma1", L, V, D, F, N, K, H, H, use_post_norms=False)
  elif family == "gemma2":
    cfg = model.gemma2_config(L, D, F, N, K, H, D // N if D == 4608 else H, V)
  else:
    cfg = model.gemma3_config(L, D, F, N, K, H, V, 512 if D <= 1152 else 1024,
                              8.0 if D >= 2560 else 1.0)
    if D == 5376:  # Gemma 3 27B scales queries by (D / N) ** -0.5
      cfg = dataclasses.replace(cfg, query_pre_attn_scalar=D // N)
  return dataclasses.replace(cfg, transposed_gating=transposed)


def _flax_tensor(stack, key: str, value: np.ndarray, cfg: ModelConfig):
  if key in ("embedder/input_embedding", "final_norm/scale"):
    stack.put(key, (), value, key)
    return
  m = re.fullmatch(r"layer_(\d+)/(.+)", key)
  if m is None:
    return  # vision tower and multimodal embedder weights of Gemma 3 are not ours
  i, rest = int(m.group(1)), m.group(2)
  if rest == "attn/qkv_einsum/w":
    stack.put("layers/attn/q_einsum/w", (i,), value[0], key)
    stack.put("layers/attn/kv_einsum/w", (i,), value[1:], key)
  elif rest == "mlp/gating_einsum/w" and cfg.transposed_gating:
    stack.put("layers/mlp/gating_einsum/w", (i,), value.swapaxes(1, 2), key)
  else:
    stack.put(f"layers/{rest}", (i,), value, key)


def _load_flax(p: Path, dtype) -> tuple[Params, ModelConfig]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckptr = ocp.PyTreeCheckpointer()
  try:
    tree = ckptr.metadata(p.absolute()).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{p}: not a readable orbax checkpoint ({type(e).__name__}: {e})") from e
  # tuple keys: Kaggle's flat names contain "/" themselves, and partial restore needs them intact
  flat = traverse_util.flatten_dict(tree)
  name = lambda k: _strip("/".join(k))
  shapes = {name(k): tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}
  meta_file = p / META_FILE
  meta = json.loads(meta_file.read_text()) if meta_file.exists() else None
  cfg = _flax_config(shapes, meta, p)
  stack = _Stacker(cfg, dtype, p)
  groups: dict[str, list[tuple]] = {}
  for k in flat:  # one restore per layer keeps at most one layer of source arrays alive
    m = re.match(r"layer_(\d+)/", name(k))
    groups.setdefault(m.group(0) if m else "", []).append(k)
  # the embedding first: while the stacked layer buffers are still untouched (np.empty pages are
  # committed on first write), its restored copy and its destination fit under 1.5x the params
  for group in sorted(groups, key=lambda g: g != ""):
    for k, v in _restore_subset(ckptr, p, flat, groups[group], dtype).items():
      _flax_tensor(stack, name(k), v, cfg)
  return stack.finish(), cfg


def _restore_subset(ckptr, p: Path, flat: dict, keys: list[tuple], dtype) -> dict[tuple, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  item = traverse_util.unflatten_dict({k: flat[k] for k in keys})
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), item)
  try:
    out = ckptr.restore(p.absolute(), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{p}: unreadable orbax data for {'/'.join(keys[0])} ("
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
  return traverse_util.flatten_dict(out)


def _to_flax_tree(params: Params, cfg: ModelConfig) -> dict[str, dict[str, np.ndarray]]:
  """Stacked params -> the official flat layout {'transformer/layer_i/attn/q_einsum': {'w': ..}}."""
  host = jax.tree.map(np.asarray, params)  # zero-copy views on CPU
  out = {"transformer/embedder": {"input_embedding": host["embedder"]["input_embedding"]},
         "transformer/final_norm": {"scale": host["final_norm"]["scale"]}}
  layer_flat = traverse_util.flatten_dict(host["layers"], sep="/")
  for i in range(cfg.num_layers):
    flat = {k: v[i] for k, v in layer_flat.items()}
    if cfg.num_heads == cfg.num_kv_heads:  # official layout fuses q, k, v when K == N
      flat["attn/qkv_einsum/w"] = np.concatenate(
          [flat.pop("attn/q_einsum/w")[None], flat.pop("attn/kv_einsum/w")])
    if cfg.transposed_gating:
      flat["mlp/gating_einsum/w"] = np.ascontiguousarray(flat["mlp/gating_einsum/w"].swapaxes(1, 2))
    for k, v in flat.items():
      module, leaf = k.rsplit("/", 1)
      out.setdefault(f"transformer/layer_{i}/{module}", {})[leaf] = v
  return out


# ---------------------------------------------------------------------------------------------
# Tokenizers


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  p = Path(path)
  if p.is_file():
    return _gguf_tokenizer(p)
  if (p / "config.json").exists():
    return AutoTokenizer.from_pretrained(str(p))
  for spm in (p / "tokenizer.model", p.parent / "tokenizer.model"):
    if spm.exists():
      from transformers import GemmaTokenizer  # pylint: disable=g-import-not-at-top
      return GemmaTokenizer.from_pretrained(str(spm.parent))
  raise CheckpointError(f"{p}: no tokenizer found; expected an HF dir, a .gguf file, or a "
                        f"tokenizer.model beside the Flax checkpoint")


def _gguf_tokenizer(p: Path):
  """Building a tokenizer from GGUF metadata takes ~30 s (262k entries); keep a saved copy
  keyed by the file's identity, so later runs load it in about a second."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  st = p.stat()
  key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
  cache = Path(os.environ.get("JAX_IT_CACHE", Path.home() / ".cache" / "jax_it")) / "tokenizers" / key
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
