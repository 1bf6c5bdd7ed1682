"""The functional Gemma forward pass (Gemma 1, 2 and 3 text models).

Axis legend used in every einsum:
  B batch, T query length, S key length, D model width, N query heads, K kv heads,
  G query heads per kv head, H head dim, F MLP width, V vocab, L layers, r LoRA rank.

Parameters keep the official Flax names, with the per-layer trees stacked along a leading L axis
(`params['layers']`) so the layers run under `jax.lax.scan`. In memory the MLP gate/up weight is
always [2, D, F] and queries/keys/values are always split into q_einsum [N, D, H] and
kv_einsum [2, K, D, H]; `jax_it/ckpt/` converts from and to the on-disk variants. Backend-specific
ways of computing the same math live in ops.py, the LoRA delta in lora.py, family facts in
families.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_it import lora as lora_lib
from jax_it import ops
from jax_it.families import PROJECTIONS, ModelConfig, Params  # noqa: F401  (model.ModelConfig)

# A large finite negative instead of -inf, so a fully masked row (padding) gives no NaN.
_MASK_VALUE = -2.3819763e38




# ---------------------------------------------------------------------------------------------
# Parameters


def init_params(key: jax.Array, cfg: ModelConfig, dtype=jnp.float32) -> Params:
  """Random parameters in the stacked in-memory layout (for tests, benchmarks and eval_shape)."""
  L, D, F, N, K, H = (cfg.num_layers, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads,
                      cfg.num_kv_heads, cfg.head_dim)
  shapes = {
      "attn": {"q_einsum": {"w": (L, N, D, H)}, "kv_einsum": {"w": (L, 2, K, D, H)},
               "attn_vec_einsum": {"w": (L, N, H, D)}},
      "mlp": {"gating_einsum": {"w": (L, 2, D, F)}, "linear": {"w": (L, F, D)}},
      "pre_attention_norm": {"scale": (L, D)}, "pre_ffw_norm": {"scale": (L, D)},
  }
  if cfg.use_post_norms:
    shapes["post_attention_norm"] = {"scale": (L, D)}
    shapes["post_ffw_norm"] = {"scale": (L, D)}
  if cfg.use_qk_norm:
    shapes["attn"]["_query_norm"] = {"scale": (L, H)}
    shapes["attn"]["_key_norm"] = {"scale": (L, H)}
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves) + 1)
  layers = jax.tree.unflatten(
      treedef, [(0.02 * jax.random.normal(k, s)).astype(dtype) for k, s in zip(keys[1:], leaves)])
  return {
      "embedder": {"input_embedding": (0.02 * jax.random.normal(keys[0], (cfg.vocab_size, D))
                                       ).astype(dtype)},
      "layers": layers,
      "final_norm": {"scale": jnp.zeros((D,), dtype)},
  }


# ---------------------------------------------------------------------------------------------
# Building blocks


def einsum(eq: str, x: jax.Array, w: jax.Array, cfg: ModelConfig, **kw) -> jax.Array:
  """A matmul of the model: `ops.einsum` with the config's matmul dtype and kernels."""
  return ops.einsum(eq, x, w, cfg.matmul_dtype, kernels=cfg.kernels, **kw)


def activation_dtype(params: Params):
  """The dtype activations run in: the embedding's, or its scales' when it is int8."""
  emb = params["embedder"]
  return emb.get("input_embedding_scale", emb["input_embedding"]).dtype


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """Gemma RMSNorm: computed in float32, weight stored as an offset from 1."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope_table(positions: jax.Array, base: float, scale: float, head_dim: int):
  """(sin, cos) [B, T, 1, H/2] of the rotary angles; computed once per forward, not per layer."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, H/2]
  return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotary embedding, half-split layout: x [B, T, N, H], sin/cos from rope_table."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def attention_bias(q_pos, k_pos, q_seg, k_seg, window: int | None = None) -> jax.Array:
  """[B, 1, 1, T, S] float32 added to the scores: 0 where a query may attend to a key (same
  segment, causal by position, within `window` when given), a large negative value elsewhere.
  An additive bias, unlike a select, needs nothing stored for the backward pass."""
  same = q_seg[:, :, None] == k_seg[:, None, :]
  delta = q_pos[:, :, None] - k_pos[:, None, :]
  ok = same & (delta >= 0)
  if window is not None:
    ok &= delta < window
  return jnp.where(ok, 0.0, _MASK_VALUE).astype(jnp.float32)[:, None, None]


def _proj(x, p, name: str, adapter: lora_lib.LayerAdapter | None, cfg: ModelConfig):
  """The projection `name` (families.PROJECTIONS) of one layer, plus its LoRA delta if any."""
  proj = PROJECTIONS[name]
  d = p[proj.param]
  y = einsum(proj.eq, x, d["w"], cfg, scale=d.get("w_scale"), part=proj.part)
  return lora_lib.add_delta(y, x, proj, adapter, cfg.matmul_dtype, cfg.kernels, base=d)


# ---------------------------------------------------------------------------------------------
# The transformer layer


def _attention(x, p, adapter, cfg, bias, sin, cos, cache):
  """Self-attention of one layer; returns the output and the updated layer cache (or None).

  `bias` is the additive mask of the XLA path (attention_bias), or (kernel, segment ids,
  is_local) for a fused kernel of ops.py, which builds its own mask."""
  B, T, _ = x.shape
  K, H = cfg.num_kv_heads, cfg.head_dim
  G = cfg.num_heads // K
  q = _proj(x, p, "q_proj", adapter, cfg)  # BTD,NDH->BTNH
  k = _proj(x, p, "k_proj", adapter, cfg)  # BSD,KDH->BSKH
  v = _proj(x, p, "v_proj", adapter, cfg)
  if cfg.use_qk_norm:
    q = rms_norm(q, p["_query_norm"]["scale"], cfg.norm_eps)
    k = rms_norm(k, p["_key_norm"]["scale"], cfg.norm_eps)
  q = rope(q, sin, cos)
  k = rope(k, sin, cos)
  q = q * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, q.dtype)
  new_cache = None
  if cache is not None:
    k, v, new_cache = _update_cache(cache, k, v)
  if not isinstance(bias, jax.Array):  # a fused kernel: (impl, segment ids, is_local)
    impl, segment_ids, is_local = bias
    if cfg.matmul_dtype is not None:
      q, k, v = (a.astype(cfg.matmul_dtype) for a in (q, k, v))
    enc = ops.fused_attention(impl, q, k, v, segment_ids, is_local, cfg.sliding_window,
                              cfg.attn_logits_soft_cap)
    return _proj(enc.astype(v.dtype), p, "o_proj", adapter, cfg), new_cache
  q = q.reshape(B, T, K, G, H)
  if cfg.matmul_dtype is None:
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  else:
    scores = einsum("BTKGH,BSKH->BKGTS", q, k, cfg)
  scores = soft_cap(scores, cfg.attn_logits_soft_cap)
  scores = scores + bias
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  enc = einsum("BKGTS,BSKH->BTKGH", probs, v, cfg).astype(v.dtype).reshape(B, T, K * G, H)
  out = _proj(enc, p, "o_proj", adapter, cfg)  # BTNH,NHD->BTD
  return out, new_cache


def _mlp(x, p, adapter, cfg):
  gate = _proj(x, p, "gate_proj", adapter, cfg)  # BTD,DF->BTF
  up = _proj(x, p, "up_proj", adapter, cfg)
  hidden = jax.nn.gelu(gate, approximate=True) * up
  return _proj(hidden, p, "down_proj", adapter, cfg)  # BTF,FD->BTD


def _layer(x, p, adapter, cfg, bias, sin, cos, cache):
  h = rms_norm(x, p["pre_attention_norm"]["scale"], cfg.norm_eps)
  h, new_cache = _attention(h, p["attn"], adapter, cfg, bias, sin, cos, cache)
  if cfg.use_post_norms:
    h = rms_norm(h, p["post_attention_norm"]["scale"], cfg.norm_eps)
  x = x + h
  h = rms_norm(x, p["pre_ffw_norm"]["scale"], cfg.norm_eps)
  h = _mlp(h, p["mlp"], adapter, cfg)
  if cfg.use_post_norms:
    h = rms_norm(h, p["post_ffw_norm"]["scale"], cfg.norm_eps)
  return x + h, new_cache


# ---------------------------------------------------------------------------------------------
# KV cache


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  """An empty KV cache of `length` slots; empty slots hold segment 0, which no query matches."""
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.zeros((batch, length), jnp.int32),
          "seg": jnp.zeros((batch, length), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def _update_cache(cache, k, v):
  """Write this call's keys/values [B, T, K, H] into layer `cache["layer"]` of the stacked
  cache [L, B, S, K, H] at the cache index, in place; return that layer's keys and values (what
  attention reads) and the stack. Only the T new slots are written: the stack travels through
  the layer loop as its carry, so no step copies the whole cache."""
  idx, i = cache["index"], cache["layer"]
  zero = jnp.zeros((), jnp.int32)
  at = (i, zero, idx, zero, zero)
  k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype)[None], at)
  v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype)[None], at)
  layer = lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)  # noqa: E731
  return layer(k_all), layer(v_all), {"k": k_all, "v": v_all}


# ---------------------------------------------------------------------------------------------
# The forward pass


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
  emb = params["embedder"]
  x = jnp.take(emb["input_embedding"], tokens, axis=0)
  if "input_embedding_scale" in emb:  # int8 rows: dequantize only the rows looked up
    scale = emb["input_embedding_scale"]
    x = x.astype(scale.dtype) * jnp.take(scale, tokens, axis=0)
  if cfg.matmul_dtype is not None:  # mixed precision: only the matmul inputs are rounded
    x = x.astype(jnp.float32)
  return x * jnp.asarray(cfg.embed_dim ** 0.5, x.dtype)


def logits_from_hidden(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Tied output projection of final-normed hidden states, float32, soft-capped for Gemma 2."""
  emb = params["embedder"]
  table = emb["input_embedding"]
  if cfg.matmul_dtype is not None:
    logits = einsum("...D,VD->...V", hidden, table, cfg)
  elif "input_embedding_scale" in emb:
    logits = jnp.einsum("...D,VD->...V", hidden, table.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("...D,VD->...V", hidden, table, preferred_element_type=jnp.float32)
  if "input_embedding_scale" in emb:  # per-row int8 scales apply to the vocab (output) axis
    logits = logits * emb["input_embedding_scale"][:, 0].astype(jnp.float32)
  return soft_cap(logits, cfg.final_logit_soft_cap)


def hidden_states(params: Params, tokens: jax.Array, cfg: ModelConfig, *, lora=None,
                  positions=None, segment_ids=None, cache=None, remat: bool = False,
                  dropout_key=None):
  """Final-normed hidden states [B, T, D] (and the updated cache when one is given)."""
  B, T = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if segment_ids is None:
    segment_ids = jnp.ones((B, T), jnp.int32)
  x = embed(params, tokens, cfg)
  local = jnp.asarray(cfg.local_layers)
  # Rotary tables and attention biases of local and global layers, built once, not per layer.
  rope_global = rope_table(positions, cfg.rope_base_global, cfg.rope_scale_global, cfg.head_dim)
  rope_local = rope_global
  if (cfg.rope_base_local, 1.0) != (cfg.rope_base_global, cfg.rope_scale_global):
    rope_local = rope_table(positions, cfg.rope_base_local, 1.0, cfg.head_dim)
  k_pos, k_seg = positions, segment_ids  # what the keys are: this call's tokens, or the cache's
  if cache is not None:
    k_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions, cache["index"], 1)
    k_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids, cache["index"], 1)
  impl = ops.attention_impl(cfg.attention, soft_cap=cfg.attn_logits_soft_cap,
                            dtype=cfg.matmul_dtype or x.dtype, cached=cache is not None,
                            length=T)
  if impl == "xla":
    bias_global = attention_bias(positions, k_pos, segment_ids, k_seg)
    bias_local = bias_global
    if cfg.sliding_window is not None and any(cfg.local_layers):
      bias_local = attention_bias(positions, k_pos, segment_ids, k_seg, cfg.sliding_window)
  lora_w, keys = None, None
  if lora is not None:
    lora_w = lora.weights
    if dropout_key is not None and lora.cfg.dropout > 0.0:
      keys = jax.random.split(dropout_key, cfg.num_layers)
  kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}

  # The layers are indexed inside the loop, not scanned over as xs: scanned weights end up as
  # residuals the backward pass stacks again, i.e. a per-step copy of every layer weight.
  layers = ops.carry(params["layers"], cfg.kernels)

  def body(carry, xs):
    x, kv = carry  # kv: the whole stacked cache, updated in place layer by layer (or None)
    i, lw, is_local, key = xs
    p = ops.take_layer(layers, i)
    adapter = None
    if lw is not None:
      adapter = lora_lib.LayerAdapter(lw, lora.cfg.scale,
                                      lora.cfg.dropout if key is not None else 0.0, key)
    layer_cache = None if kv is None else dict(kv, index=cache["index"], layer=i)
    pick = lambda a, b: a if a is b else jnp.where(is_local, a, b)  # noqa: E731
    sin, cos = (pick(a, b) for a, b in zip(rope_local, rope_global))
    mask = ((impl, segment_ids, is_local) if impl != "xla" else pick(bias_local, bias_global))
    return _layer(x, p, adapter, cfg, mask, sin, cos, layer_cache), None

  if remat:
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  (x, new_kv), _ = jax.lax.scan(body, (x, kv), (jnp.arange(cfg.num_layers), lora_w, local, keys))
  x = rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
  if cache is None:
    return x
  new_cache = {
      "k": new_kv["k"], "v": new_kv["v"],
      "pos": k_pos, "seg": k_seg,
      "index": cache["index"] + T,
  }
  return x, new_cache


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, *, lora=None, positions=None,
            segment_ids=None, cache=None, remat: bool = False):
  """tokens int32 [B, T] -> float32 logits [B, T, V] (and the new cache when `cache` is given).

  positions default to 0..T-1 and segment_ids to all ones (one example per row, no padding);
  packed rows give each example its own segment id and positions restarting at 0, and tokens of
  different segments never attend to each other.
  """
  out = hidden_states(params, tokens, cfg, lora=lora, positions=positions,
                      segment_ids=segment_ids, cache=cache, remat=remat)
  if cache is None:
    return logits_from_hidden(params, out, cfg)
  hidden, new_cache = out
  return logits_from_hidden(params, hidden, cfg), new_cache
