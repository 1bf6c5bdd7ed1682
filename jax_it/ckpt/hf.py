"""Hugging Face safetensors: read a transformers Gemma directory, and export one (save_hf)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from flax import traverse_util

from jax_it.ckpt import CheckpointError
from jax_it.ckpt.stack import Stacker, copy_rows, to_matrix
from jax_it.families import FAMILIES, PROJECTIONS, Family, Projection, axis_sizes, layer_pattern
from jax_it.model import ModelConfig, Params

# an explicit null soft cap means "off"; any other null means "the class default"
_NULLABLE = ("attn_logit_softcapping", "final_logit_softcapping", "rope_scaling")


def find(p: Path) -> Path | None:
  """p when it is a transformers model directory."""
  return p if (p / "config.json").exists() else None


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _family(model_type, where: str) -> Family:
  for fam in FAMILIES.values():
    if model_type in fam.hf_types:
      return fam
  types = sorted(t for f in FAMILIES.values() for t in f.hf_types)
  raise CheckpointError(f"{where}: model_type {model_type!r} is not a Gemma text model; "
                        f"expected one of {types}")


def _rope_entry(entry: dict, where: str, default_theta: float) -> tuple[float, float]:
  kind = entry.get("rope_type", entry.get("type", "default"))
  if kind not in ("default", "linear"):
    raise CheckpointError(f"{where}: rope type {kind!r} is not supported; "
                          "expected default or linear")
  return float(entry.get("rope_theta", default_theta)), float(entry.get("factor", 1.0))


def _hf_rope(d: dict, fam: Family, where: str) -> tuple[float, float, float]:
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
  if fam.rope_base_local is None:  # one base for all layers
    local = glob
  if local[1] != 1.0:
    raise CheckpointError(f"{where}: rope scaling on sliding-window layers is not supported")
  return local[0], glob[0], glob[1]


def hf_config_to_model(d: dict, vocab_rows: int, where: str = "config.json") -> ModelConfig:
  """Map a transformers Gemma config dict (gemma / gemma2 / gemma3_text / gemma3) to ModelConfig."""
  fam = _family(d.get("model_type"), where)
  if "text_config" in d and d["model_type"] in fam.hf_types[1:]:  # a multimodal wrapper
    d = {"model_type": fam.hf_types[0], **d["text_config"]}
    fam = _family(d.get("model_type"), where)
  d = {**fam.hf_defaults, **{k: v for k, v in d.items() if v is not None or k in _NULLABLE}}
  L = d["num_hidden_layers"]
  if "layer_types" in d and d["layer_types"]:
    local = tuple(t == "sliding_attention" for t in d["layer_types"])
  elif "sliding_window_pattern" in fam.hf_defaults:  # configs older than layer_types
    local = layer_pattern(L, d["sliding_window_pattern"])
  else:
    local = fam.local_layers(L)
  base_local, base_global, scale = _hf_rope(d, fam, where)
  H = d["head_dim"]
  return fam.config(
      L, d["hidden_size"], d["intermediate_size"], d["num_attention_heads"],
      d["num_key_value_heads"], H, vocab_size=vocab_rows,
      query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", H)),
      attn_logits_soft_cap=d.get("attn_logit_softcapping"),
      final_logit_soft_cap=d.get("final_logit_softcapping"),
      sliding_window=d.get("sliding_window") if any(local) else None, local_layers=local,
      rope_base_local=base_local, rope_base_global=base_global, rope_scale_global=scale,
      norm_eps=float(d.get("rms_norm_eps", 1e-6)))


# ---------------------------------------------------------------------------------------------
# Reading


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
  raise CheckpointError(f"{p}: config.json without model.safetensors or "
                        "model.safetensors.index.json")


def _safe_open(f: Path):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if not f.exists():
    raise CheckpointError(f"{f}: missing safetensors shard")
  try:
    return safe_open(str(f), framework="numpy")
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e


def _layer_names(fam: Family) -> dict[str, Projection | str]:
  """Tensor name inside a decoder layer -> its projection, or the norm it holds.

  The norms of every family are known, so another family's norm fails as "no place in this
  model" instead of being skipped; this family's names win (Gemma 1's post_attention_layernorm).
  """
  names = {p.hf + ".weight": p for p in PROJECTIONS.values()}
  for f in (*FAMILIES.values(), fam):
    names.update({hf + ".weight": norm for norm, hf in f.hf_norms.items()})
  return names


def load(p: Path, dtype) -> tuple[Params, ModelConfig]:
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
  names = _layer_names(FAMILIES[cfg.family])
  stack = Stacker(cfg, dtype, p)
  layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.+)")
  for f, h in zip(files, handles):
    try:
      for name in h.keys():
        _hf_tensor(stack, h, name, prefix, layer_re, names, cfg)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{f}: unreadable safetensors data ({e})") from e
  return stack.finish(), cfg


def _hf_tensor(stack, h, name, prefix, layer_re, names, cfg):
  f32 = lambda x: np.asarray(x, np.float32)
  if name == prefix + "embed_tokens.weight":
    sl = h.get_slice(name)
    copy_rows(stack, "embedder/input_embedding", name, sl.get_shape(), lambda a, b: sl[a:b])
  elif name == prefix + "norm.weight":
    stack.put("final_norm/scale", (), f32(h.get_tensor(name)), name)
  elif m := layer_re.fullmatch(name):
    what = names.get(m.group(2))
    if what is not None:  # e.g. rotary inv_freq buffers of old checkpoints are skipped
      stack.put_layer(what, int(m.group(1)), f32(h.get_tensor(name)), name, axis_sizes(cfg))


# ---------------------------------------------------------------------------------------------
# Export


def hf_config(cfg: ModelConfig):
  """The transformers config object of the installed version for this model."""
  import transformers  # pylint: disable=g-import-not-at-top
  fam = FAMILIES[cfg.family]
  kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
            intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
            hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1,
            bos_token_id=2, tie_word_embeddings=True)
  # only the keys the family's transformers class has (hf_defaults lists them)
  if "query_pre_attn_scalar" in fam.hf_defaults:
    q = cfg.query_pre_attn_scalar  # transformers wants an int where the value is one
    kw["query_pre_attn_scalar"] = int(q) if float(q).is_integer() else q
  if "attn_logit_softcapping" in fam.hf_defaults:
    kw.update(attn_logit_softcapping=cfg.attn_logits_soft_cap,
              final_logit_softcapping=cfg.final_logit_soft_cap)
  if fam.local_period is not None:
    kw.update(sliding_window=cfg.sliding_window, layer_types=[
        "sliding_attention" if local else "full_attention" for local in cfg.local_layers])
  if fam.rope_base_local is None:
    kw["rope_theta"] = cfg.rope_base_global
  else:
    global_rope = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
    if cfg.rope_scale_global != 1.0:
      global_rope = {"rope_type": "linear", "factor": cfg.rope_scale_global,
                     "rope_theta": cfg.rope_base_global}
    kw["rope_parameters"] = {
        "full_attention": global_rope,
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local}}
  return transformers.AutoConfig.for_model(fam.hf_types[0], **kw)


def hf_tensors(params: Params, cfg: ModelConfig):
  """(name, float32 array) pairs in the transformers layout, one layer at a time."""
  f32 = lambda x: np.asarray(x, np.float32)
  yield "model.embed_tokens.weight", f32(params["embedder"]["input_embedding"])
  yield "model.norm.weight", f32(params["final_norm"]["scale"])
  lp = traverse_util.flatten_dict(params["layers"], sep="/")
  norms = {n: hf for n, hf in FAMILIES[cfg.family].hf_norms.items() if f"{n}/scale" in lp}
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    for p in PROJECTIONS.values():
      w = lp[f"{p.block}/{p.param}/w"][i]
      yield pre + p.hf + ".weight", to_matrix(f32(w if p.part is None else w[p.part]), p)
    for norm, hf in norms.items():
      yield pre + hf + ".weight", f32(lp[f"{norm}/scale"][i])


def save_hf(params: Params, cfg: ModelConfig, out_dir: str, tokenizer=None):
  """config.json + model.safetensors (+ tokenizer), loadable by AutoModelForCausalLM.

  Written into a temporary folder beside out_dir and renamed at the end, so an interrupted
  export never leaves a half-written model directory.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not empty; remove it or choose another "
                          "output folder")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    conf = hf_config(cfg)
    conf.architectures = [FAMILIES[cfg.family].hf_class]
    conf.save_pretrained(tmp)
    tensors = {name: np.ascontiguousarray(x) for name, x in hf_tensors(params, cfg)}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
      os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
