"""Flax/orbax checkpoints in the official Gemma layout: the reader, and the writer (+ jax_it.json).

Our own saves carry a `jax_it.json` beside the orbax files: the ModelConfig fields, which settle
what shapes alone cannot (Gemma 3 27B's query scale, gating layout when D == F, ...). Without it
(a Kaggle checkpoint) the config comes from the shapes and the family table.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jax_it.ckpt import CheckpointError
from jax_it.ckpt.stack import Stacker
from jax_it.families import FAMILIES, Family
from jax_it.model import ModelConfig, Params

META_FILE = "jax_it.json"
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


def find(p: Path) -> Path | None:
  """The orbax checkpoint in p, or in its only subdirectory (Kaggle's, beside tokenizer.model)."""
  if not p.is_dir():
    return None
  if any((p / m).exists() for m in _ORBAX_MARKERS):
    return p
  subdirs = [d for d in p.iterdir() if d.is_dir()]
  if len(subdirs) == 1 and any((subdirs[0] / m).exists() for m in _ORBAX_MARKERS):
    return subdirs[0]
  return None


# ---------------------------------------------------------------------------------------------
# Reading


def _strip(key: str) -> str:
  for prefix in ("params/", "transformer/"):
    key = key.removeprefix(prefix)
  return key


def _family(shapes: dict[str, tuple], where: Path) -> Family:
  """The newest family whose telltale norm the checkpoint has (QK norms, else post-norms)."""
  for fam in reversed(FAMILIES.values()):
    telltale = ("attn/_query_norm" if fam.qk_norm else
                "post_attention_norm" if fam.post_norms else None)
    if telltale is None or f"layer_0/{telltale}/scale" in shapes:
      return fam
  raise CheckpointError(f"{where}: shapes fit no Gemma family (no family has its norms)")


def _config(shapes: dict[str, tuple], meta: dict | None, where: Path) -> ModelConfig:
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
  fam = _family(shapes, where)
  # the official models of a family differ in window, RoPE scale and query scale by width
  return fam.config(
      len(layers), D, F, N, K, H, vocab_size=V, query_pre_attn_scalar=fam.query_scalar(D, N, H),
      sliding_window=fam.window(D), rope_scale_global=fam.rope_scale(D),
      transposed_gating=fam.transposed_gating(D) if D == F else gating == (2, F, D))


def _tensor(stack, key: str, value: np.ndarray, cfg: ModelConfig):
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


def load(p: Path, dtype) -> tuple[Params, ModelConfig]:
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
  cfg = _config(shapes, meta, p)
  stack = Stacker(cfg, dtype, p)
  groups: dict[str, list[tuple]] = {}
  for k in flat:  # one restore per layer keeps at most one layer of source arrays alive
    m = re.match(r"layer_(\d+)/", name(k))
    groups.setdefault(m.group(0) if m else "", []).append(k)
  # the embedding first: while the stacked layer buffers are still untouched (np.empty pages are
  # committed on first write), its restored copy and its destination fit under 1.5x the params
  for group in sorted(groups, key=lambda g: g != ""):
    for k, v in _restore_subset(ckptr, p, flat, groups[group], dtype).items():
      _tensor(stack, name(k), v, cfg)
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


# ---------------------------------------------------------------------------------------------
# Writing


def save(params: Params, cfg: ModelConfig, path: Path) -> None:
  """An orbax checkpoint in the official flat Flax layout, plus jax_it.json."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = Path(path).absolute()
  ocp.PyTreeCheckpointer().save(path, _to_flax_tree(params, cfg), force=True)
  (path / META_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


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
