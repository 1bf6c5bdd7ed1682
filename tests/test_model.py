"""Numerics of model.forward against transformers' eager PyTorch Gemma 1, 2 and 3."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_it import model, weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_forward = jax.jit(model.forward, static_argnames=("cfg", "remat"))

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, initializer_range=0.2)


def _tiny_hf(kind: str):
  """A tiny transformers model of the given family with random non-trivial norm weights."""
  if kind == "gemma1":
    cfg = transformers.GemmaConfig(num_hidden_layers=2, **TINY)
    cls = transformers.GemmaForCausalLM
  elif kind == "gemma2":
    # small caps so both soft-caps are active; a window shorter than the sequence
    cfg = transformers.Gemma2Config(num_hidden_layers=3, sliding_window=5, query_pre_attn_scalar=12,
                                    attn_logit_softcapping=3.0, final_logit_softcapping=2.0, **TINY)
    cls = transformers.Gemma2ForCausalLM
  else:
    # 7 layers: layer 5 is global; linear rope scaling on global layers as in Gemma 3 4B+
    cfg = transformers.Gemma3TextConfig(
        num_hidden_layers=7, sliding_window=5, query_pre_attn_scalar=10,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, **TINY)
    cls = transformers.Gemma3ForCausalLM
  torch.manual_seed(0)
  m = cls(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.copy_(0.5 * torch.randn_like(p))
  return m


@pytest.fixture(scope="module", params=["gemma1", "gemma2", "gemma3"])
def tiny(request, tmp_path_factory):
  """(torch model, params, cfg) for one family, round-tripped through save_pretrained."""
  m = _tiny_hf(request.param)
  path = tmp_path_factory.mktemp(request.param)
  m.save_pretrained(path)
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
  cfg = dataclasses.replace(model.PRESETS[name], vocab_size=vocab)
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count


def test_gemma3_270m_preset_matches_gguf_config(gemma3_params):
  _, cfg = gemma3_params
  preset = model.PRESETS["gemma3-270m"]
  assert dataclasses.replace(cfg, norm_eps=preset.norm_eps) == preset


def test_real_gemma3_270m_matches_transformers_gguf(gemma3_params, gemma3_torch):
  params, cfg = gemma3_params
  tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (1, 600))
  with torch.no_grad():
    ref = gemma3_torch(torch.tensor(tokens)).logits.numpy()
  out = _forward(params, jnp.asarray(tokens), cfg)
  assert out.shape == ref.shape
  assert _ratio(out, ref) <= 1e-4


@pytest.mark.parametrize("eq,x_shape,w_shape,part,int8", [
    ("BTD,NDH->BTNH", (2, 5, 8), (3, 8, 4), None, False),
    ("BTD,DF->BTF", (2, 5, 8), (2, 8, 6), 1, False),
    ("BTD,DF->BTF", (2, 5, 8), (2, 8, 6), 0, True),
    ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 8), None, True),
    ("BKGTS,BSKH->BTKGH", (2, 1, 3, 5, 5), (2, 5, 1, 4), None, False),
])
def test_einsum_backward_matches_autodiff(eq, x_shape, w_shape, part, int8):
  """model.einsum's hand-written VJP: equal to JAX's autodiff of jnp.einsum (float32), and
  within bfloat16 rounding of it with dtype="bfloat16"."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape)
  scale = None
  if int8:
    axes = tuple(range(1, len(w_shape) - 1)) if part is None else (1,)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    w = jnp.round(w / scale).astype(jnp.int8)
  dense = w if scale is None else w.astype(jnp.float32) * scale
  dense = dense if part is None else dense[part]

  def ours(x, w, dtype=None):
    return model.einsum(eq, x, w, dtype, scale=scale, part=part)

  out_shape = jnp.einsum(eq, x, dense).shape
  g = jax.random.normal(kg, out_shape)
  y_ref, vjp_ref = jax.vjp(lambda x, d: jnp.einsum(eq, x, d), x, dense)
  dx_ref, dd_ref = vjp_ref(g)
  for dtype, tol in ((None, 1e-6), ("bfloat16", 2e-2)):
    if int8:
      y, vjp = jax.vjp(lambda x: ours(x, w, dtype), x)
      (dx,) = vjp(g)
    else:
      y, vjp = jax.vjp(lambda x, w: ours(x, w, dtype), x, w)
      dx, dw = vjp(g)
      dw = dw if part is None else dw[part]
      assert _ratio(dw, dd_ref) <= tol, (dtype, "dw")
    assert y.dtype == jnp.float32
    assert _ratio(y, y_ref) <= tol and _ratio(dx, dx_ref) <= tol, dtype
