"""Flax/orbax checkpoints in Gemma's own layouts: reader, writer (+ jax_it.json), LoRA import.

Google's gemma library (gm.ckpts) reads three layouts of the same tree, and so does this reader:
the Kaggle release, flat (`transformer/layer_0/attn/q_einsum` holding {'w': ..}); what
gm.ckpts.save_params writes, the nested Flax `init()` tree, whose MLP weights lack the 'w' level
(`layer_0/mlp/linear`); and a Kauldron training state, the nested tree under 'params'. Gemma 4
stacks its layers by attention type and Gemma 3n adds modules: both are refused by name.

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
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jax_it import model
from jax_it.ckpt import CheckpointError
from jax_it.ckpt.stack import Stacker
from jax_it.families import FAMILIES, PROJECTIONS, Family
from jax_it.model import ModelConfig, Params

META_FILE = "jax_it.json"
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")

# Keys only other Gemma generations have (gm.nn's names): refused by name, not misread as Gemma 3
_OTHER_FAMILIES = (("stacked_layers/", "Gemma 4"), ("/skip_scale", "Gemma 4"),
                   ("/altup/", "Gemma 3n"), ("/laurel/", "Gemma 3n"),
                   ("per_layer_input_embedding", "Gemma 3n or Gemma 4"),
                   ("attn/query_norm/", "Gemma 3n or Gemma 4"))
# what a text model does not read: gm.nn.LoRA's adapters inside the base weights' scopes, and
# Gemma 3's image projection (its vision tower lies outside layer_*/embedder/final_norm)
_SKIPPED = re.compile(r"(^|/)lora/|^embedder/mm_")


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


def _name(key: tuple) -> str:
  """Our name of a checkpoint key: layout prefixes stripped, the MLP's 'w' level restored."""
  name = "/".join(key)
  for prefix in ("params/", "transformer/"):
    name = name.removeprefix(prefix)
  return name + "/w" if re.search(r"mlp/(gating_einsum|linear)$", name) else name


def _is_text(name: str) -> bool:
  return bool(re.match(r"(layer_\d+|embedder|final_norm)/", name)) and not _SKIPPED.search(name)


def _family(shapes: dict[str, tuple], first: str, where: Path) -> Family:
  """The newest family whose telltale norm the checkpoint has (QK norms, else post-norms)."""
  for fam in reversed(FAMILIES.values()):
    telltale = ("attn/_query_norm" if fam.qk_norm else
                "post_attention_norm" if fam.post_norms else None)
    if telltale is None or f"{first}{telltale}/scale" in shapes:
      return fam
  raise CheckpointError(f"{where}: shapes fit no Gemma family (no family has its norms)")


def _dims(shapes: dict[str, tuple], where: Path) -> tuple[str, tuple[int, ...]]:
  """The first layer's prefix, and (L, V, D, F, N, K, H) each from a tensor whose other axes pin
  it down, so that a transposed tensor shows up in _check under its own name."""
  layers = {int(m.group(1)) for k in shapes if (m := re.match(r"layer_(\d+)/", k))}
  first = f"layer_{min(layers, default=0)}/"
  try:
    V, D = shapes["embedder/input_embedding"]
    if f"{first}attn/qkv_einsum/w" in shapes:
      _, N, *dh = shapes[f"{first}attn/qkv_einsum/w"]
      K = N
    else:
      N = shapes[f"{first}attn/q_einsum/w"][0]
      _, K, *dh = shapes[f"{first}attn/kv_einsum/w"]
    H = dh[1] if dh[0] == D else dh[0]
    two, *df = shapes[f"{first}mlp/gating_einsum/w"]
  except (KeyError, ValueError, IndexError) as e:
    raise CheckpointError(f"{where}: shapes fit no Gemma family (missing or odd {e})") from e
  if two != 2 or len(df) != 2 or D not in df:
    raise CheckpointError(f"{where}: shapes fit no Gemma family (gating {(two, *df)} for D={D})")
  F = df[1] if df[0] == D else df[0]
  return first, (max(layers) + 1, V, D, F, N, K, H)


def _config(shapes: dict[str, tuple], meta: dict | None, where: Path) -> ModelConfig:
  """Config from jax_it.json when our saver wrote one (_check then holds the shapes to it), else
  from the checkpoint's shapes and the family table."""
  if meta is not None:
    return ModelConfig(**{**meta, "local_layers": tuple(meta["local_layers"])})
  first, (L, V, D, F, N, K, H) = _dims(shapes, where)
  fam = _family(shapes, first, where)
  transposed = shapes[f"{first}mlp/gating_einsum/w"] == (2, F, D)
  # the official models of a family differ in window, RoPE scale and query scale by width
  return fam.config(
      L, D, F, N, K, H, vocab_size=V, query_pre_attn_scalar=fam.query_scalar(D, N, H),
      sliding_window=fam.window(D), rope_scale_global=fam.rope_scale(D),
      transposed_gating=fam.transposed_gating(D) if D == F else transposed)


def _official_shapes(cfg: ModelConfig) -> dict[str, tuple]:
  """Every tensor of cfg in the official layout (our names, unstacked) and its shape."""
  D, F, N, H = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.head_dim
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  out = {}
  for k, s in traverse_util.flatten_dict(shapes, sep="/").items():
    if not k.startswith("layers/"):
      out[k] = s.shape
      continue
    k, shape = k.removeprefix("layers/"), s.shape[1:]
    if N == cfg.num_kv_heads and k.startswith("attn/"):  # the official layout fuses q, k, v
      if k == "attn/kv_einsum/w":
        continue
      if k == "attn/q_einsum/w":
        k, shape = "attn/qkv_einsum/w", (3, N, D, H)
    if k == "mlp/gating_einsum/w" and cfg.transposed_gating:
      shape = (2, F, D)
    out.update({f"layer_{i}/{k}": shape for i in range(cfg.num_layers)})
  return out


def _check(shapes: dict[str, tuple], want: dict[str, tuple], cfg: ModelConfig, where: Path,
           disk: dict[str, str]):
  """Every tensor there with its shape, none extra: one line naming the first that is not."""
  for name, shape in want.items():
    if name not in shapes:
      layer = re.match(r"layer_\d+/", name)
      if layer and not any(k.startswith(layer.group(0)) for k in shapes):
        raise CheckpointError(f"{where}: missing {layer.group(0)[:-1]} of layers 0-"
                              f"{cfg.num_layers - 1}, expected {name} of shape {shape} and more")
      raise CheckpointError(f"{where}: missing {name}, expected shape {shape}")
    if shapes[name] != shape:
      raise CheckpointError(f"{where}: {disk[name]} has shape {shapes[name]}, expected {shape}")
  for name in sorted(shapes.keys() - want.keys())[:1]:
    raise CheckpointError(f"{where}: {disk[name]} {shapes[name]} has no place in a "
                          f"{cfg.family} model of {cfg.num_layers} layers")


def _refuse_other_families(keys: list[str], where: Path):
  for telltale, family in _OTHER_FAMILIES:  # the surest telltales first
    for key in keys:
      if telltale in key:
        raise CheckpointError(f"{where}: {key} is a {family} parameter; {family} checkpoints "
                              f"are not supported (families: {', '.join(FAMILIES)})")


def _tensor(stack, key: str, value: np.ndarray, cfg: ModelConfig):
  if key in ("embedder/input_embedding", "final_norm/scale"):
    stack.put(key, (), value, key)
    return
  m = re.fullmatch(r"layer_(\d+)/(.+)", key)
  i, rest = int(m.group(1)), m.group(2)
  if rest == "attn/qkv_einsum/w":
    stack.put("layers/attn/q_einsum/w", (i,), value[0], key)
    stack.put("layers/attn/kv_einsum/w", (i,), value[1:], key)
  elif rest == "mlp/gating_einsum/w" and cfg.transposed_gating:
    stack.put("layers/mlp/gating_einsum/w", (i,), value.swapaxes(1, 2), key)
  else:
    stack.put(f"layers/{rest}", (i,), value, key)


def _open(p: Path):
  """(checkpointer, flat metadata tree with tuple keys)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckptr = ocp.PyTreeCheckpointer()
  try:
    tree = ckptr.metadata(p.absolute()).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{p}: not a readable orbax checkpoint ({type(e).__name__}: {e})") from e
  # tuple keys: Kaggle's flat names contain "/" themselves, and partial restore needs them intact
  return ckptr, traverse_util.flatten_dict(tree)


def load(p: Path, dtype) -> tuple[Params, ModelConfig]:
  ckptr, flat = _open(p)
  names = {k: _name(k) for k in flat}
  _refuse_other_families(["/".join(k) for k in flat], p)
  shapes = {n: tuple(flat[k].shape) for k, n in names.items()
            if _is_text(n) and hasattr(flat[k], "shape")}
  disk = {n: "/".join(k) for k, n in names.items()}
  meta_file = p / META_FILE
  meta = json.loads(meta_file.read_text()) if meta_file.exists() else None
  cfg = _config(shapes, meta, p)
  want = _official_shapes(cfg)
  _check(shapes, want, cfg, p, disk)
  stack = Stacker(cfg, dtype, p)
  groups: dict[str, list[tuple]] = {}
  for k, n in names.items():  # one restore per layer keeps at most one layer of arrays alive
    if n in want:
      m = re.match(r"layer_(\d+)/", n)
      groups.setdefault(m.group(0) if m else "", []).append(k)
  # the embedding first: while the stacked layer buffers are still untouched (np.empty pages are
  # committed on first write), its restored copy and its destination fit under 1.5x the params
  for group in sorted(groups, key=lambda g: g != ""):
    for k, v in _restore_subset(ckptr, p, flat, groups[group], dtype).items():
      _tensor(stack, names[k], v, cfg)
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
# LoRA weights of the gemma library (gm.nn.LoRA)

# gm.nn.LoRA's adapter of a weight `w` lies beside it: x @ a @ b added unscaled, b's leading axes
# after r those of the weight's outputs (kv_einsum: [r, 2, K, H], so k and v share one a)
_LORA_KEY = re.compile(r"layer_(\d+)/(?:attn|mlp)/(?:_LoRAEinsum_)?(\w+?)/(?:_LoRAEinsum_\w+/)?"
                       r"lora/([ab])$")
_FUSED = {"qkv_einsum": {"q_proj": 0, "k_proj": 1, "v_proj": 2}}


def load_lora(source, cfg: ModelConfig, dtype=np.float32):
  """gm.nn.LoRA's weights as our adapter (alpha = r: the library does not scale).

  source: the library's params (a nested dict, with or without the base weights), or the orbax
  checkpoint gm.ckpts.save_params wrote of them.
  """
  from jax_it import lora as lora_lib  # pylint: disable=g-import-not-at-top
  if isinstance(source, dict):
    where, flat = "params", traverse_util.flatten_dict(source)
  else:
    where = Path(source)
    ckptr, meta = _open(where)
    keys = [k for k in meta if _LORA_KEY.search(_name(k))]
    flat = _restore_subset(ckptr, where, meta, keys, dtype) if keys else {}
  found: dict[str, dict[str, list]] = {}
  for k, v in flat.items():
    if (m := _LORA_KEY.search(_name(k))) is None:
      continue
    layer, module, which = int(m.group(1)), m.group(2), m.group(3)
    if layer >= cfg.num_layers:
      raise CheckpointError(f"{where}: {'/'.join(k)} is for layer_{layer}; the model has "
                            f"{cfg.num_layers} layers")
    parts = _FUSED.get(module) or {p.name: p.part for p in PROJECTIONS.values()
                                   if p.param == module}
    x = np.asarray(v, dtype)
    for target, part in parts.items():
      slots = found.setdefault(target, {"a": [None] * cfg.num_layers, "b": [None] * cfg.num_layers})
      split = which == "b" and part is not None and x.ndim > 1 and x.shape[1] > part
      slots[which][layer] = x[:, part] if split else x  # a wrong shape is named below
  if not found:
    raise CheckpointError(f"{where}: no gm.nn.LoRA weights (no .../lora/a, .../lora/b)")
  r = next((x.shape[-1] for ab in found.values() for x in ab["a"] if x is not None), 0)
  weights = {}
  for target, ab in found.items():
    ins, outs = lora_lib.io_shapes(target, cfg)
    for which, want in (("a", (*ins, r)), ("b", (r, *outs))):
      for i, x in enumerate(ab[which]):
        if x is None or x.shape != want:
          got = "missing" if x is None else f"shape {x.shape}"
          raise CheckpointError(f"{where}: LoRA {which} of {target} in layer_{i}: {got}, "
                                f"expected {want}")
    weights[target] = {w: jnp.asarray(np.stack(ab[w])) for w in ("a", "b")}
  return lora_lib.Lora(weights, lora_lib.LoraConfig(r=r, alpha=float(r), targets=tuple(weights)))


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
