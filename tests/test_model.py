"""Numerics of model.forward against transformers' eager PyTorch Gemma 1, 2 and 3."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_it import families, model, weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_forward = jax.jit(model.forward, static_argnames=("cfg", "remat"))


@pytest.fixture(scope="module", params=["gemma1", "gemma2", "gemma3"])
def tiny(request, tmp_path_factory):
  """(torch model, params, cfg) for one family, round-tripped through save_pretrained.

  reference.FAMILY_DEFAULTS: Gemma 2 with soft-caps 3 and 2 (both active) and a window of 5
  (shorter than the sequences below), Gemma 3 with 7 layers (layer 5 global) and linear rope
  scaling on global layers.
  """
  from jax_it import reference as ref
  path = tmp_path_factory.mktemp(request.param)
  m = ref.tiny_hf(request.param, save_to=path)
  params, cfg = weights.load(path)
  return m, params, cfg


def _ratio(out, ref) -> float:
  return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def test_tiny_matches_transformers(tiny):
  m, params, cfg = tiny
  # two different rows, longer than the sliding window
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 17))
  with torch.no_grad():
    ref = m(torch.tensor(tokens)).logits.numpy()
  assert _ratio(_forward(params, jnp.asarray(tokens), cfg), ref) <= 1e-5


def test_tiny_config_mapping(tiny):
  m, _, cfg = tiny
  assert cfg.num_layers == m.config.num_hidden_layers
  if cfg.family == "gemma2":
    assert (cfg.attn_logits_soft_cap, cfg.final_logit_soft_cap) == (3.0, 2.0)
    assert cfg.local_layers == (True, False, True) and cfg.sliding_window == 5
  if cfg.family == "gemma3":
    assert cfg.local_layers == (True,) * 5 + (False, True)
    assert (cfg.rope_base_local, cfg.rope_base_global, cfg.rope_scale_global) == (1e4, 1e6, 8.0)
    assert cfg.query_pre_attn_scalar == 10


def test_packed_row_matches_separate_examples(tiny):
  _, params, cfg = tiny
  rng = np.random.RandomState(2)
  a, b = rng.randint(0, cfg.vocab_size, 7), rng.randint(0, cfg.vocab_size, 9)
  packed = jnp.asarray(np.concatenate([a, b])[None])
  segs = jnp.asarray([[1] * 7 + [2] * 9])
  pos = jnp.asarray([list(range(7)) + list(range(9))])
  out = np.asarray(_forward(params, packed, cfg, positions=pos, segment_ids=segs))
  alone_a = np.asarray(_forward(params, jnp.asarray(a[None]), cfg))
  alone_b = np.asarray(_forward(params, jnp.asarray(b[None]), cfg))
  assert _ratio(out[:, :7], alone_a) <= 1e-5
  assert _ratio(out[:, 7:], alone_b) <= 1e-5


def test_remat_gives_same_logits(tiny):
  _, params, cfg = tiny
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 11)))
  plain = np.asarray(_forward(params, tokens, cfg))
  remat = np.asarray(_forward(params, tokens, cfg, remat=True))
  assert _ratio(remat, plain) <= 1e-6


# The parameter counts published with the official checkpoints (HF vocabulary of 256000 rows
# for Gemma 2; 262144 for Gemma 3).
OFFICIAL_COUNTS = {
    "gemma2-2b": (256_000, 2_614_341_888),
    "gemma2-9b": (256_000, 9_241_705_984),
    "gemma2-27b": (256_000, 27_227_128_320),
    "gemma3-270m": (262_144, 268_098_176),
    "gemma3-1b": (262_144, 999_885_952),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_preset_param_counts(name):
  vocab, count = OFFICIAL_COUNTS[name]
  cfg = dataclasses.replace(families.PRESETS[name], vocab_size=vocab)
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count


def test_gemma3_270m_preset_matches_gguf_config(gemma3_params):
  _, cfg = gemma3_params
  preset = families.PRESETS["gemma3-270m"]
  assert dataclasses.replace(cfg, norm_eps=preset.norm_eps) == preset


def test_real_gemma3_270m_matches_transformers_gguf(gemma3_params, gemma3_torch):
  params, cfg = gemma3_params
  tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (1, 600))
  with torch.no_grad():
    ref = gemma3_torch(torch.tensor(tokens)).logits.numpy()
  out = _forward(params, jnp.asarray(tokens), cfg)
  assert out.shape == ref.shape
  assert _ratio(out, ref) <= 1e-4
