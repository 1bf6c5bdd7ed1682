"""The functional Gemma forward pass (Gemma 1, 2 and 3 text models).

Axis legend used in every einsum:
  B batch, T query length, S key length, D model width, N query heads, K kv heads,
  G query heads per kv head, H head dim, F MLP width, V vocab, L layers, r LoRA rank.

Parameters keep the official Flax names, with the per-layer trees stacked along a leading L axis
(`params['layers']`) so the layers run under `jax.lax.scan`. In memory the MLP gate/up weight is
always [2, D, F] and queries/keys/values are always split into q_einsum [N, D, H] and
kv_einsum [2, K, D, H]; `weights.py` converts from and to the on-disk variants.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]

# A large finite negative instead of -inf, so a fully masked row (padding) gives no NaN.
_MASK_VALUE = -2.3819763e38
FAMILIES = ("gemma1", "gemma2", "gemma3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a Gemma text model; hashable, passed to jit as a static argument."""

  family: str
  num_layers: int
  vocab_size: int  # rows of the embedding table (may include padding rows)
  embed_dim: int
  hidden_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  attn_logits_soft_cap: float | None = None
  final_logit_soft_cap: float | None = None
  sliding_window: int | None = None
  # one entry per layer: True where the layer uses sliding-window (local) attention
  local_layers: tuple[bool, ...] = ()
  rope_base_local: float = 10_000.0
  rope_base_global: float = 10_000.0
  rope_scale_global: float = 1.0  # global-layer positions are divided by this (Gemma 3 4B+: 8)
  use_post_norms: bool = True
  use_qk_norm: bool = False
  norm_eps: float = 1e-6
  # layout of the checkpoint this config came from, kept so saving reproduces it
  transposed_gating: bool = False
  # compute, not architecture: when set (e.g. "bfloat16"), every matmul rounds its inputs to this
  # dtype and accumulates in float32 (see `einsum`); None keeps the inputs' own dtype
  matmul_dtype: str | None = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown Gemma family {self.family!r}; expected one of {FAMILIES}")
    if not self.local_layers:
      object.__setattr__(self, "local_layers", (False,) * self.num_layers)
    if len(self.local_layers) != self.num_layers:
      raise ValueError(f"local_layers has {len(self.local_layers)} entries for {self.num_layers} layers")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{self.num_heads} query heads do not divide into {self.num_kv_heads} kv heads")

  @property
  def num_params(self) -> int:
    """Parameter count of the model as this config describes it."""
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), self))
    return sum(int(x.size) for x in jax.tree.leaves(shapes))


def layer_pattern(num_layers: int, period: int) -> tuple[bool, ...]:
  """Local/global pattern: every `period`-th layer (1-based) is global, the others local."""
  return tuple((i + 1) % period != 0 for i in range(num_layers))


def gemma2_config(num_layers, embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim,
                  query_pre_attn_scalar, vocab_size=256_128, sliding_window=4096) -> ModelConfig:
  return ModelConfig(
      family="gemma2", num_layers=num_layers, vocab_size=vocab_size, embed_dim=embed_dim,
      hidden_dim=hidden_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      query_pre_attn_scalar=query_pre_attn_scalar, attn_logits_soft_cap=50.0,
      final_logit_soft_cap=30.0, sliding_window=sliding_window,
      local_layers=layer_pattern(num_layers, 2), transposed_gating=embed_dim > 2304)


def gemma3_config(num_layers, embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim=256,
                  vocab_size=262_144, sliding_window=1024, rope_scale_global=1.0) -> ModelConfig:
  return ModelConfig(
      family="gemma3", num_layers=num_layers, vocab_size=vocab_size, embed_dim=embed_dim,
      hidden_dim=hidden_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
      local_layers=layer_pattern(num_layers, 6), rope_base_local=10_000.0,
      rope_base_global=1_000_000.0, rope_scale_global=rope_scale_global, use_qk_norm=True,
      transposed_gating=True)


PRESETS: dict[str, ModelConfig] = {
    "gemma2-2b": gemma2_config(26, 2304, 9216, 8, 4, 256, 256),
    "gemma2-9b": gemma2_config(42, 3584, 14336, 16, 8, 256, 256),
    "gemma2-27b": gemma2_config(46, 4608, 36864, 32, 16, 128, 144),
    "gemma3-270m": gemma3_config(18, 640, 2048, 4, 1, sliding_window=512),
    "gemma3-1b": gemma3_config(26, 1152, 6912, 4, 1, sliding_window=512),
    # for smoke runs and tests: Gemma 2 features at toy width, sized for the Gemma 3 tokenizer
    "gemma2-tiny": gemma2_config(2, 64, 128, 4, 2, 16, 16, vocab_size=262_144, sliding_window=32),
}


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


def einsum(eq: str, x: jax.Array, w: jax.Array, dtype: str | None = None, *,
           scale: jax.Array | None = None, part: int | None = None) -> jax.Array:
  """`jnp.einsum(eq, x, w)` with a hand-written backward pass; w may be an int8 weight.

  With `dtype` (e.g. "bfloat16") both inputs are rounded to it and the result is float32: the
  matmul reaches the fast bfloat16 units with float32 accumulation, and the backward pass rounds
  the incoming gradient the same way, so its matmuls are as fast as the forward one. `scale`
  dequantizes an int8 `w` (see quant.py); `part` uses `w[part]`, one half of a stacked gate/up
  or key/value weight. The backward pass keeps `w` itself, not a slice, dequantized or rounded
  copy: under `lax.scan` over layers a derived weight would be stored once per layer.
  """
  dtype = None if dtype is None else jnp.dtype(dtype).name
  return _einsum(eq, dtype, part, x, w, scale)


def _weight_part(w, scale, part):
  if part is not None:
    w, scale = w[part], None if scale is None else scale[part]
  return w if scale is None else w.astype(scale.dtype) * scale


def _einsum_fwd(eq, dtype, part, x, w, scale):
  wp = _weight_part(w, scale, part)
  if dtype is None:
    return jnp.einsum(eq, x, wp), (x, w, scale, jnp.zeros((0,), x.dtype))
  xl = x.astype(dtype)
  out = jnp.einsum(eq, xl, wp.astype(dtype), preferred_element_type=jnp.float32)
  return out, (xl, w, scale, jnp.zeros((0,), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _einsum(eq, dtype, part, x, w, scale):
  return _einsum_fwd(eq, dtype, part, x, w, scale)[0]


def _einsum_bwd(eq, dtype, part, res, g):
  x, w, scale, x_like = res
  wp = _weight_part(w, scale, part)
  ins, out = eq.split("->")
  a, b = ins.split(",")
  if dtype is None:
    dx = jnp.einsum(f"{out},{b}->{a}", g, wp)
    dwp = jnp.einsum(f"{a},{out}->{b}", x, g)
  else:
    g, wp = g.astype(dtype), wp.astype(dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", g, wp, preferred_element_type=jnp.float32)
    dwp = jnp.einsum(f"{a},{out}->{b}", x, g, preferred_element_type=jnp.float32)
  # The gradient of a frozen base weight is never used and XLA drops it; it is formed so that
  # the rule is a complete VJP (LoRA weights and the attention core use it).
  if scale is not None:  # an int8 weight: no gradient
    return dx.astype(x_like.dtype), None, None
  dw = dwp.astype(w.dtype)
  if part is not None:
    dw = jnp.zeros_like(w).at[part].set(dw)
  return dx.astype(x_like.dtype), dw, None


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


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


@dataclasses.dataclass(frozen=True)
class _LoraCtx:
  """Per-layer LoRA weights plus what applying them needs (scale, dropout rate and key)."""
  weights: dict
  scale: float = 1.0
  dropout: float = 0.0
  key: jax.Array | None = None


def _proj(x, d, eq, ctx: _LoraCtx | None, name: str, salt: int, mm: str | None,
          part: int | None = None):
  """`einsum(eq, x, W)` plus the LoRA delta scale * (x A) B when the adapter targets `name`.

  W is the weight dict `d` (int8 or not), or its half `part`; `mm` is the config's
  matmul_dtype. A contracts the trailing input axes of x (A: [*in, r]) and B maps r to the
  output axes (B: [r, *out]), so one rule serves every projection and W + BA is never formed.
  """
  y = einsum(eq, x, d["w"], mm, scale=d.get("w_scale"), part=part)
  if ctx is None or name not in ctx.weights:
    return y.astype(x.dtype)
  a, b = ctx.weights[name]["a"], ctx.weights[name]["b"]
  if ctx.dropout > 0.0 and ctx.key is not None:
    keep = jax.random.bernoulli(jax.random.fold_in(ctx.key, salt), 1.0 - ctx.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - ctx.dropout), 0).astype(x.dtype)
  if mm is None:
    xa = jnp.tensordot(x.astype(a.dtype), a, axes=a.ndim - 1)
    delta = jnp.tensordot(xa, b, axes=1) * ctx.scale
    return y + delta.astype(y.dtype)
  lead = "".join(chr(ord("a") + i) for i in range(x.ndim - (a.ndim - 1)))  # not "r"
  ins, outs = "ABCD"[:a.ndim - 1], "EFGH"[:b.ndim - 1]
  xa = einsum(f"{lead}{ins},{ins}r->{lead}r", x, a, mm)
  delta = einsum(f"{lead}r,r{outs}->{lead}{outs}", xa, b, mm)
  return (y + delta * ctx.scale).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# The transformer layer


def _attention(x, p, ctx, cfg, bias, sin, cos, cache):
  """Self-attention of one layer; returns the output and the updated layer cache (or None)."""
  B, T, _ = x.shape
  K, H = cfg.num_kv_heads, cfg.head_dim
  G = cfg.num_heads // K
  mm = cfg.matmul_dtype
  q = _proj(x, p["q_einsum"], "BTD,NDH->BTNH", ctx, "q_proj", 0, mm)
  k = _proj(x, p["kv_einsum"], "BSD,KDH->BSKH", ctx, "k_proj", 1, mm, part=0)
  v = _proj(x, p["kv_einsum"], "BSD,KDH->BSKH", ctx, "v_proj", 2, mm, part=1)
  if cfg.use_qk_norm:
    q = rms_norm(q, p["_query_norm"]["scale"], cfg.norm_eps)
    k = rms_norm(k, p["_key_norm"]["scale"], cfg.norm_eps)
  q = rope(q, sin, cos)
  k = rope(k, sin, cos)
  q = q * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, q.dtype)
  new_cache = None
  if cache is not None:
    k, v, new_cache = _update_cache(cache, k, v)
  q = q.reshape(B, T, K, G, H)
  if mm is None:
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  else:
    scores = einsum("BTKGH,BSKH->BKGTS", q, k, mm)
  scores = soft_cap(scores, cfg.attn_logits_soft_cap)
  scores = scores + bias
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  enc = einsum("BKGTS,BSKH->BTKGH", probs, v, mm).astype(v.dtype).reshape(B, T, K * G, H)
  out = _proj(enc, p["attn_vec_einsum"], "BTNH,NHD->BTD", ctx, "o_proj", 3, mm)
  return out, new_cache


def _mlp(x, p, ctx, mm):
  gate = _proj(x, p["gating_einsum"], "BTD,DF->BTF", ctx, "gate_proj", 4, mm, part=0)
  up = _proj(x, p["gating_einsum"], "BTD,DF->BTF", ctx, "up_proj", 5, mm, part=1)
  hidden = jax.nn.gelu(gate, approximate=True) * up
  return _proj(hidden, p["linear"], "BTF,FD->BTD", ctx, "down_proj", 6, mm)


def _layer(x, p, ctx, cfg, bias, sin, cos, cache):
  h = rms_norm(x, p["pre_attention_norm"]["scale"], cfg.norm_eps)
  h, new_cache = _attention(h, p["attn"], ctx, cfg, bias, sin, cos, cache)
  if cfg.use_post_norms:
    h = rms_norm(h, p["post_attention_norm"]["scale"], cfg.norm_eps)
  x = x + h
  h = rms_norm(x, p["pre_ffw_norm"]["scale"], cfg.norm_eps)
  h = _mlp(h, p["mlp"], ctx, cfg.matmul_dtype)
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
  """Write this call's keys/values at the cache index; return what attention reads."""
  idx = cache["index"]
  k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), idx, 1)
  v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), idx, 1)
  return k_all, v_all, {"k": k_all, "v": v_all}


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
    logits = einsum("...D,VD->...V", hidden, table, cfg.matmul_dtype)
  elif "input_embedding_scale" in emb:
    logits = jnp.einsum("...D,VD->...V", hidden, table.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("...D,VD->...V", hidden, table, preferred_element_type=jnp.float32)
  if "input_embedding_scale" in emb:  # per-row int8 scales apply to the vocab (output) axis
    logits = logits * emb["input_embedding_scale"][:, 0].astype(jnp.float32)
  return soft_cap(logits, cfg.final_logit_soft_cap)


def _to_bits(w):
  return jax.lax.bitcast_convert_type(w, jnp.uint16) if w.dtype == jnp.bfloat16 else w


def _from_bits(w):
  return jax.lax.bitcast_convert_type(w, jnp.bfloat16) if w.dtype == jnp.uint16 else w


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
  # residuals the backward pass stacks again, i.e. a per-step copy of every layer weight. bfloat16
  # weights travel as uint16 bit patterns, because XLA's CPU backend otherwise keeps a float32
  # copy of each stacked bfloat16 weight to slice from (2x the weights' bytes, every step).
  layers = jax.tree.map(_to_bits, params["layers"])

  def body(x, xs):
    i, lw, is_local, layer_kv, key = xs
    p = jax.tree.map(lambda w: _from_bits(jax.lax.dynamic_index_in_dim(w, i, keepdims=False)),
                     layers)
    ctx = None
    if lw is not None:
      ctx = _LoraCtx(lw, lora.cfg.scale, lora.cfg.dropout if key is not None else 0.0, key)
    layer_cache = None
    if layer_kv is not None:
      layer_cache = dict(layer_kv, index=cache["index"])
    pick = lambda a, b: a if a is b else jnp.where(is_local, a, b)  # noqa: E731
    sin, cos = (pick(a, b) for a, b in zip(rope_local, rope_global))
    return _layer(x, p, ctx, cfg, pick(bias_local, bias_global), sin, cos, layer_cache)

  if remat:
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  x, new_kv = jax.lax.scan(body, x, (jnp.arange(cfg.num_layers), lora_w, local, kv, keys))
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
