"""Google's own JAX Gemma (the `gemma` package): its checkpoints, forward and LoRA against ours.

Tiny random models built with gm.nn (gm.nn.Transformer takes any TransformerConfig), saved the
way the library saves them (gm.ckpts.save_params: the nested Flax tree) and in the layout of the
Kaggle release (the library's own FLAT conversion), read by weights.load; what weights.save
writes is restored by gm.ckpts.load_params. Logits are compared in float32 on a padded batch
longer than the sliding window, against the library's own forward.

gemma 3.3.0 is installed without its dependencies (pyproject's `interop` extra says why): its
gm.nn imports kauldron, whose import chain names tensorflow, tensorboard and tensorflow-datasets
(tf.Tensor in array type aliases, clu's TensorBoard writer) without using them for building,
running, saving or loading a model. Empty stand-ins for those three serve while gemma is
imported, and are removed from sys.modules afterwards.
"""

import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jax_it import model, weights
from jax_it.ckpt import flax as ckpt_flax
from jax_it.families import FAMILIES, ModelConfig
from jax_it.reference import rel_err

pytest.importorskip("gemma", reason="Google's gemma package: pyproject's `interop` extra, then "
                    "pip install --no-deps gemma==3.3.0 kauldron==1.4.2")
ocp = pytest.importorskip("orbax.checkpoint")

VOCAB, WINDOW, LENGTH = 64, 5, 16  # sequences of 16 tokens outrun the window of 5
_STUBBED = ("tensorflow", "tensorboard", "tensorflow_datasets")


class _Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Empty packages standing in for `names`; any attribute of them is a new empty class."""

  def __init__(self, names):
    self.names = names

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in self.names:
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__getattr__ = lambda attr: type(attr, (), {})
    return module

  def exec_module(self, module):
    module.__path__ = []


# what importing kauldron wraps process-wide (for its own key objects); put back after the import
# so that the tests after these run on jax and flax as they were
_WRAPPED = (("jax._src.random.core", "_check_prng_key"), ("flax.core.scope", "_is_valid_rng"))


def _attr(module, name):
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError):
    return None


@contextlib.contextmanager
def _stand_ins():
  missing = [n for n in _STUBBED if importlib.util.find_spec(n) is None]
  finder = _Stubs(missing)
  sys.meta_path.insert(0, finder)
  saved = [(m, a, fn) for m, a in _WRAPPED if (fn := _attr(m, a)) is not None]
  try:
    yield
  finally:
    sys.meta_path.remove(finder)
    for name in [m for m in sys.modules if m.split(".")[0] in missing]:
      del sys.modules[name]
    for m, a, fn in saved:
      setattr(sys.modules[m], a, fn)


@pytest.fixture(scope="module")
def gm():
  """gemma.gm with what these tests touch imported (gm's names load lazily)."""
  with _stand_ins():
    from kauldron import kd
    # gemma 3.3.0 subclasses kd.ckpts.AbstractPartialLoader, which kauldron 1.4 renamed
    # InitTransform (gemma's main branch uses the new name; the 1.3 releases predate jax 0.10)
    if not hasattr(kd.ckpts, "AbstractPartialLoader"):
      kd.ckpts.AbstractPartialLoader = kd.ckpts.InitTransform
    from gemma import gm
    from gemma.gm.ckpts import _checkpoint
    from gemma.gm.nn.gemma3n import _transformer as gemma3n
    for name in ("Transformer", "LoRA", "AttentionType", "config", "Gemma3n_E2B"):
      getattr(gm.nn, name)
    for name in ("TransformerConfig", "make_attention_layers_types", "GEMMA3_ATTENTION_PATTERN"):
      getattr(gm.nn.config, name)
    for name in ("save_params", "load_params"):
      getattr(gm.ckpts, name)
    for name in ("sharding", "train"):
      getattr(kd, name)
  return types.SimpleNamespace(nn=gm.nn, ckpts=gm.ckpts, to_flat=_checkpoint._nested_to_flat,
                               gemma3n=gemma3n.Gemma3nTransformer)


# ---------------------------------------------------------------------------------------------
# Tiny models of each family, in the library and in our config


def _lib_config(gm, kind):
  A = gm.nn.AttentionType
  c = gm.nn.config
  base = dict(num_embed=VOCAB, embed_dim=16, hidden_dim=24, num_heads=2, head_dim=8,
              num_kv_heads=1, use_post_attn_norm=True, use_post_ffw_norm=True,
              sliding_window_size=WINDOW)
  gemma2 = dict(final_logit_softcap=30.0, attn_logits_soft_cap=50.0,
                attention_types=(A.LOCAL_SLIDING, A.GLOBAL))
  if kind == "gemma2":  # Gemma 2 2B's layout: gate/up [2, D, F], multi-query
    return c.TransformerConfig(**base, **gemma2)
  if kind == "gemma2-mha":  # 27B's [2, F, D] gating and query scale D / N (not H); K == N, so
    return c.TransformerConfig(  # q, k, v in one qkv_einsum
        **{**base, "num_kv_heads": 2, "head_dim": 4}, **gemma2, transpose_gating_einsum=True,
        query_pre_attn_norm=c.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS)
  return c.TransformerConfig(  # Gemma 3 4B+: grouped-query, QK norms, 5 local : 1 global,
      **{**base, "num_heads": 4, "num_kv_heads": 2}, final_logit_softcap=None,  # RoPE scale 8
      use_qk_norm=True, transpose_gating_einsum=True, local_base_frequency=10_000,
      global_base_frequency=1_000_000, global_scale_factor=8.0,
      attention_types=c.make_attention_layers_types(c.GEMMA3_ATTENTION_PATTERN, num_layers=6))


def _our_config(gm, lc) -> ModelConfig:
  """The library's config in our terms, stated independently of the reader."""
  A = gm.nn.AttentionType
  by_width = lc.query_pre_attn_norm.name == "BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS"
  return ModelConfig(
      family="gemma3" if lc.use_qk_norm else "gemma2", num_layers=len(lc.attention_types),
      vocab_size=lc.num_embed, embed_dim=lc.embed_dim, hidden_dim=lc.hidden_dim,
      num_heads=lc.num_heads, num_kv_heads=lc.num_kv_heads, head_dim=lc.head_dim,
      query_pre_attn_scalar=lc.embed_dim // lc.num_heads if by_width else lc.head_dim,
      attn_logits_soft_cap=lc.attn_logits_soft_cap,
      final_logit_soft_cap=lc.final_logit_softcap, sliding_window=lc.sliding_window_size,
      local_layers=tuple(t == A.LOCAL_SLIDING for t in lc.attention_types),
      rope_base_local=lc.local_base_frequency, rope_base_global=lc.global_base_frequency,
      rope_scale_global=lc.global_scale_factor, use_post_norms=lc.use_post_attn_norm,
      use_qk_norm=lc.use_qk_norm, transposed_gating=lc.transpose_gating_einsum)


def _batch():
  """Three rows: full, right-padded, left-padded (pad id 0, as the library assumes)."""
  tokens = np.random.default_rng(0).integers(1, VOCAB, (3, LENGTH)).astype(np.int32)
  tokens[1, -5:] = 0
  tokens[2, :4] = 0
  mask = tokens != 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask.astype(np.int32)), mask


def _randomize(tree, seed, scale=0.3):
  """Every leaf random (the library's init leaves norms and LoRA b at zero)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape, np.float32)),
                      tree)


_forward = jax.jit(model.forward, static_argnames="cfg")


def _ours(params, cfg, lora=None):
  tokens, positions, segments, mask = _batch()
  out = _forward(params, tokens, cfg=cfg, lora=lora, positions=positions, segment_ids=segments)
  return np.asarray(out)[mask]


def _theirs(module, params):
  tokens, _, _, mask = _batch()
  return np.asarray(module.apply({"params": params}, tokens).logits)[mask]


@pytest.fixture(scope="module", params=["gemma2", "gemma2-mha", "gemma3"])
def lib(gm, request):
  """(library model, its random float32 params, their logits, our config of it)."""
  lc = _lib_config(gm, request.param)
  module = gm.nn.Transformer(config=lc, dtype=jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), _batch()[0])["params"]
  params = _randomize(shapes, 1)
  params["embedder"]["input_embedding"] /= 0.3  # logits of a few units: the soft-caps bite
  return module, params, _theirs(module, params), _our_config(gm, lc)


def _save_raw(tree, path):
  """As gm.ckpts.save_params writes a tree."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path.absolute(), tree)
  ckptr.wait_until_finished()


# ---------------------------------------------------------------------------------------------
# Their checkpoints, our reader; our writer, their reader


@pytest.mark.parametrize("layout", ["saved", "kaggle"])
def test_library_checkpoint_loads_with_its_logits(gm, lib, layout, tmp_path):
  module, params, theirs, cfg = lib
  path = tmp_path / layout
  if layout == "saved":
    gm.ckpts.save_params(params, path, wait_until_finished=True)
  else:
    _save_raw(gm.to_flat(params), path)  # the library's own conversion to the Kaggle layout
    restored = gm.ckpts.load_params(path)  # the library reads its own flat layout back
    assert jax.tree.all(jax.tree.map(np.array_equal, restored, params))
  loaded, inferred = weights.load(path)
  # window, RoPE scale and query scale are no tensors: the reader gives the official model's of
  # that width (family table); the tiny models set their own, and run with them
  fam, D, N, H = FAMILIES[cfg.family], cfg.embed_dim, cfg.num_heads, cfg.head_dim
  assert inferred == dataclasses.replace(
      cfg, sliding_window=fam.window(D), rope_scale_global=fam.rope_scale(D),
      query_pre_attn_scalar=fam.query_scalar(D, N, H))
  err = rel_err(_ours(loaded, cfg), theirs)
  print(f"{cfg.family} K={cfg.num_kv_heads} {layout}: max rel err {err:.2e}")
  assert err <= 1e-5


def test_our_save_restores_in_the_library(gm, lib, tmp_path):
  module, params, theirs, cfg = lib
  gm.ckpts.save_params(params, tmp_path / "lib", wait_until_finished=True)
  ours, _ = weights.load(tmp_path / "lib")
  weights.save(ours, cfg, tmp_path / "ours")
  restored = gm.ckpts.load_params(tmp_path / "ours")
  assert jax.tree.all(jax.tree.map(np.array_equal, restored, params))  # the very same tree
  err = rel_err(_theirs(module, restored), _ours(ours, cfg))
  print(f"{cfg.family} K={cfg.num_kv_heads} weights.save -> gm.ckpts: max rel err {err:.2e}")
  assert err <= 1e-5
  np.testing.assert_array_equal(_theirs(module, restored), theirs)


def test_library_lora_imports_into_our_adapter(gm, lib, tmp_path):
  module, params, base_logits, cfg = lib
  lora_module = gm.nn.LoRA(rank=3, model=module, dtype=jnp.float32)
  shapes = jax.eval_shape(lora_module.init, jax.random.key(0), _batch()[0])["params"]
  flat = traverse_util.flatten_dict(_randomize(shapes, 2, 0.2))
  flat.update(traverse_util.flatten_dict(params))  # the base weights of `lib`, the adapters new
  both = traverse_util.unflatten_dict(flat)
  theirs = _theirs(lora_module, both)
  gm.ckpts.save_params(both, tmp_path / "lora", wait_until_finished=True)
  base, _ = weights.load(tmp_path / "lora")  # the base reader passes over the adapters
  adapter = ckpt_flax.load_lora(tmp_path / "lora", cfg)
  assert adapter.cfg.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj") and adapter.cfg.scale == 1.0
  err = rel_err(_ours(base, cfg, adapter), theirs)
  print(f"{cfg.family} K={cfg.num_kv_heads} gm.nn.LoRA: max rel err {err:.2e}")
  assert err <= 1e-5 and rel_err(theirs, base_logits) > 1e-2  # the adapter does change them
  same = ckpt_flax.load_lora(both, cfg)  # the param tree itself reads the same
  assert jax.tree.all(jax.tree.map(np.array_equal, same.weights, adapter.weights))


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the path, the key and the expected shape


def _one_line_error(path, match):
  with pytest.raises(weights.CheckpointError, match=match) as e:
    weights.load(path)
  assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.fixture(scope="module")
def gemma3_flat(gm):
  lc = _lib_config(gm, "gemma3")
  module = gm.nn.Transformer(config=lc, dtype=jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), _batch()[0])["params"]
  return gm.to_flat(_randomize(shapes, 3))


def test_gemma3n_checkpoint_is_refused_by_name(gm, tmp_path):
  lc = dataclasses.replace(  # Gemma 3n E2B's config at toy size
      gm.nn.Gemma3n_E2B.config, num_embed=VOCAB, embed_dim=16, hidden_dim=24, num_heads=2,
      head_dim=8, num_kv_heads=1, attention_types=gm.nn.Gemma3n_E2B.config.attention_types[3:5],
      vision_encoder=None, activation_sparsity_pattern=(0.0, 0.0), per_layer_input_dim=4,
      laurel_rank=2, sliding_window_size=WINDOW, kv_cache_sharing_config=None)
  module = gm.gemma3n(config=lc, dtype=jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), _batch()[0])["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  gm.ckpts.save_params(params, tmp_path / "g3n", wait_until_finished=True)
  _one_line_error(tmp_path / "g3n", r"g3n: layer_\d/(altup|laurel)/\S+ is a Gemma 3n parameter")


def test_gemma4_layout_is_refused_by_name(gm, gemma3_flat, tmp_path):
  """gemma's main branch (not released on PyPI at 3.3.0) says Gemma 4 checkpoints stack the
  layers by attention type: transformer/stacked_layers/attention_type_<j>/..., layer
  i = slice * pattern + j (gm/ckpts/_compat.py). That layout, built here by hand."""
  tree, stacked = {}, {}
  for k, v in gemma3_flat.items():
    m = re.fullmatch(r"transformer/layer_(\d+)/(.+)", k)
    if m is None:
      tree[k] = v
      continue
    j = int(m.group(1)) % len(gm.nn.config.GEMMA3_ATTENTION_PATTERN)
    stacked.setdefault(f"transformer/stacked_layers/attention_type_{j}/{m.group(2)}", []).append(v)
  tree.update({k: {n: np.stack([v[n] for v in vs]) for n in vs[0]} for k, vs in stacked.items()})
  _save_raw(tree, tmp_path / "g4")
  _one_line_error(tmp_path / "g4", r"g4: .*stacked_layers.* Gemma 4 .*not supported")


def test_missing_layer(gemma3_flat, tmp_path):
  tree = {k: v for k, v in gemma3_flat.items() if not k.startswith("transformer/layer_2/")}
  _save_raw(tree, tmp_path / "cut")
  _one_line_error(tmp_path / "cut", r"cut: missing layer_2 of layers 0-5, expected "
                  r"layer_2/attn/_key_norm/scale of shape \(8,\)")


@pytest.mark.parametrize("key,axes,want", [
    ("transformer/layer_0/attn/q_einsum", (0, 2, 1), r"layer_0/attn/q_einsum/w has shape "
     r"\(4, 8, 16\), expected \(4, 16, 8\)"),
    ("transformer/layer_3/attn/attn_vec_einsum", (2, 1, 0), r"layer_3/attn/attn_vec_einsum/w "
     r"has shape \(16, 8, 4\), expected \(4, 8, 16\)"),
    ("transformer/layer_5/mlp/linear", (1, 0), r"layer_5/mlp/linear/w has shape \(16, 24\), "
     r"expected \(24, 16\)"),
])
def test_transposed_param(gemma3_flat, key, axes, want, tmp_path):
  tree = dict(gemma3_flat, **{key: {"w": np.asarray(gemma3_flat[key]["w"]).transpose(axes)}})
  _save_raw(tree, tmp_path / "bad")
  _one_line_error(tmp_path / "bad", f"bad: transformer/{want}")

