"""ops.py: the XLA:CPU workarounds compute what the plain (accelerator) path computes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_it import lora, model, ops, train
from jax_it.reference import random_batch

TINY = model.ModelConfig(
    family="gemma2", num_layers=3, vocab_size=300, embed_dim=32, hidden_dim=64, num_heads=4,
    num_kv_heads=2, head_dim=8, query_pre_attn_scalar=8, attn_logits_soft_cap=50.0,
    final_logit_soft_cap=30.0, sliding_window=6, local_layers=(True, False, True))


def _ratio(out, ref) -> float:
  return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


def _random_params(cfg, dtype=jnp.float32):
  """Weights large enough that every layer shapes the output (init_params' are near zero)."""
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(0)
  out = [jnp.asarray((0.5 if "norm" in jax.tree_util.keystr(p) else 0.2)
                     * rng.standard_normal(x.shape), dtype) for p, x in leaves]
  return jax.tree.unflatten(treedef, out)


def _loss_and_grads(params, cfg, adapter, batch, kernels):
  cfg = dataclasses.replace(cfg, kernels=kernels)
  fn = jax.jit(jax.value_and_grad(
      lambda a: train.mean_loss(a, params, batch, cfg, train.TrainConfig(loss_chunk=16))))
  return fn(adapter)


def _adapter(cfg, targets):
  a = lora.init(jax.random.key(1), cfg, lora.LoraConfig(r=4, targets=targets))
  return a.replace(weights=jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), a.weights))


def _compare_kernels(params, cfg, adapter, batch, loss_tol, grad_tol):
  loss_cpu, g_cpu = _loss_and_grads(params, cfg, adapter, batch, "cpu")
  loss_plain, g_plain = _loss_and_grads(params, cfg, adapter, batch, "plain")
  assert abs(float(loss_cpu) - float(loss_plain)) / abs(float(loss_plain)) <= loss_tol
  errors = {jax.tree_util.keystr(p): _ratio(x, y) for (p, x), y in zip(
      jax.tree_util.tree_flatten_with_path(g_cpu.weights)[0], jax.tree.leaves(g_plain.weights))}
  assert max(errors.values()) <= grad_tol, errors


@pytest.mark.parametrize("matmul, loss_tol, grad_tol", [(None, 1e-6, 1e-5),
                                                        ("bfloat16", 1e-3, 3e-2)])
def test_cpu_and_plain_kernels_agree_on_tiny_gemma2(matmul, loss_tol, grad_tol):
  cfg = dataclasses.replace(TINY, matmul_dtype=matmul)
  params = _random_params(cfg)
  batch = train.add_loss_index(random_batch(np.random.default_rng(0), 2, 20, cfg.vocab_size))
  _compare_kernels(params, cfg, _adapter(cfg, "all-linear"), batch, loss_tol, grad_tol)


def test_cpu_and_plain_kernels_agree_on_gemma3_270m(gemma3_params):
  params, cfg = gemma3_params
  batch = train.add_loss_index(random_batch(np.random.default_rng(0), 2, 24, 20_000))
  _compare_kernels(params, cfg, _adapter(cfg, ("q_proj", "v_proj")), batch, 1e-6, 1e-5)


def test_cpu_path_carries_bfloat16_as_bits_and_plain_does_not():
  w = {"w": jnp.ones((2, 3), jnp.bfloat16)}
  assert ops.carry(w, "cpu")["w"].dtype == jnp.uint16
  assert ops.carry(w, "plain")["w"].dtype == jnp.bfloat16
  assert ops.take_layer(ops.carry(w, "cpu"), jnp.int32(1))["w"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="model.kernels='cuda'"):
    ops.resolve("cuda")


@pytest.mark.parametrize("kernels", ["cpu", "plain"])
@pytest.mark.parametrize("eq,x_shape,w_shape,part,int8", [
    ("BTD,NDH->BTNH", (2, 5, 8), (3, 8, 4), None, False),
    ("BTD,DF->BTF", (2, 5, 8), (2, 8, 6), 1, False),
    ("BTD,DF->BTF", (2, 5, 8), (2, 8, 6), 0, True),
    ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 8), None, True),
    ("BKGTS,BSKH->BTKGH", (2, 1, 3, 5, 5), (2, 5, 1, 4), None, False),
])
def test_einsum_backward_matches_autodiff(eq, x_shape, w_shape, part, int8, kernels):
  """ops.einsum (the hand-written VJP on "cpu", autodiff on "plain"): equal to JAX's autodiff of
  jnp.einsum (float32), and within bfloat16 rounding of it with dtype="bfloat16"."""
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
    return ops.einsum(eq, x, w, dtype, scale=scale, part=part, kernels=kernels)

  out_shape = jnp.einsum(eq, x, dense).shape
  g = jax.random.normal(kg, out_shape)
  y_ref, vjp_ref = jax.vjp(lambda x, d: jnp.einsum(eq, x, d), x, dense)
  dx_ref, dd_ref = vjp_ref(g)
  for dtype, tol in ((None, 1e-6), ("bfloat16", 2e-2)):
    if int8:
      y, vjp = jax.vjp(lambda x, dtype=dtype: ours(x, w, dtype), x)
      (dx,) = vjp(g)
    else:
      y, vjp = jax.vjp(lambda x, w, dtype=dtype: ours(x, w, dtype), x, w)
      dx, dw = vjp(g)
      dw = dw if part is None else dw[part]
      assert _ratio(dw, dd_ref) <= tol, (dtype, "dw")
    assert y.dtype == jnp.float32
    assert _ratio(y, y_ref) <= tol and _ratio(dx, dx_ref) <= tol, dtype


# ---------------------------------------------------------------------------------------------
# Attention kernels: the fused kernels' code run on CPU (splash in Pallas interpret mode, the
# cuDNN call's arguments through jax.nn.dot_product_attention's XLA implementation), against
# the XLA path of model._attention (scores, soft-cap, additive mask, softmax).


def _packed(rng, batch, length, vocab):
  """random_batch with each row packed from 3 examples and a padded tail (segment 0); positions
  restart at 0 in each segment, as packing.py lays rows out."""
  b = random_batch(rng, batch, length, vocab)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(8, length - 16), 2, replace=False))
    seg = np.searchsorted(cuts, np.arange(length), side="right") + 1
    seg[length - 5:] = 0
    start = np.maximum.accumulate(np.where(np.r_[True, seg[1:] != seg[:-1]], np.arange(length), 0))
    b["segment_ids"][row], b["positions"][row] = seg, np.arange(length) - start
  b["loss_mask"] &= b["segment_ids"] > 0
  return b


@pytest.fixture
def force_kernel(monkeypatch):
  """Make `auto` pick kernel `name` on this CPU, running its code in the CPU-capable mode."""
  def force(name):
    monkeypatch.setattr(ops, "_BACKEND_ATTENTION", {jax.default_backend(): name})
    monkeypatch.setattr(ops, "PALLAS_INTERPRET", True)
    monkeypatch.setattr(ops, "CUDNN_IMPLEMENTATION", "xla")
  return force


def _loss_and_lora_grads(params, cfg, adapter, batch):
  fn = jax.jit(jax.value_and_grad(
      lambda a: train.mean_loss(a, params, batch, cfg, train.TrainConfig(loss_chunk=64))))
  return fn(adapter)


GEMMA3_TINY = dataclasses.replace(
    TINY, family="gemma3", attn_logits_soft_cap=None, final_logit_soft_cap=None,
    use_qk_norm=True, rope_base_global=1e6, num_layers=2, local_layers=(True, False))


@pytest.mark.parametrize("kernel, cfg", [
    ("splash", TINY),          # Gemma 2: soft-cap, sliding window, grouped queries
    ("cudnn", GEMMA3_TINY),    # Gemma 3: no soft-cap (cuDNN has none), sliding window
])
def test_fused_attention_kernels_give_the_xla_paths_loss_and_grads(force_kernel, monkeypatch,
                                                                   kernel, cfg):
  """Packed rows of 128 tokens (3 examples, a padded tail), LoRA on q/k/v/o, float32: the model
  with the kernel against the model with the XLA path."""
  cfg = dataclasses.replace(cfg, kernels="plain")
  params = _random_params(cfg)
  adapter = _adapter(cfg, ("q_proj", "k_proj", "v_proj", "o_proj"))
  batch = train.add_loss_index(_packed(np.random.default_rng(0), 2, 128, cfg.vocab_size))
  loss_x, g_x = _loss_and_lora_grads(params, dataclasses.replace(cfg, attention="xla"), adapter,
                                     batch)
  force_kernel(kernel)
  if kernel == "cudnn":  # cuDNN takes 16-bit inputs only; its arguments are checked in float32
    monkeypatch.setattr(ops, "attention_impl", lambda *a, cached, **kw: "xla" if cached else kernel)
  loss_k, g_k = _loss_and_lora_grads(params, cfg, adapter, batch)
  assert abs(float(loss_k) - float(loss_x)) / float(loss_x) <= 1e-6
  errors = {jax.tree_util.keystr(p): _ratio(x, y) for (p, x), y in zip(
      jax.tree_util.tree_flatten_with_path(g_k.weights)[0], jax.tree.leaves(g_x.weights))}
  assert max(errors.values()) <= 1e-5, errors
  # the kernel changes the numbers when the mask is wrong: one segment per row is another loss
  unpacked = dict(batch, segment_ids=np.ones_like(batch["segment_ids"]))
  assert abs(float(_loss_and_lora_grads(params, cfg, adapter, unpacked)[0]) - float(loss_k)) > 1e-3


def test_attention_kernel_choice_and_its_errors(force_kernel, capsys):
  backend = jax.default_backend()
  pick = lambda name, **kw: ops.attention_impl(name, **{  # noqa: E731
      "soft_cap": None, "dtype": "bfloat16", "cached": False, "length": 256, **kw})
  assert pick("auto") == pick("xla") == "xla"  # this CPU has no fused kernel
  with pytest.raises(ValueError, match=f"model.attention='cudnn': the {backend} backend has no "
                     "cudnn kernel; supported there: auto, xla$"):
    pick("cudnn")
  with pytest.raises(ValueError, match="model.attention='flash': expected one of auto, xla"):
    pick("flash")
  force_kernel("cudnn")
  assert pick("auto") == pick("cudnn") == "cudnn"
  assert pick("auto", cached=True) == "xla"  # decoding with a KV cache
  assert pick("auto", soft_cap=50.0) == "xla"
  assert "xla instead of cudnn: cuDNN has no logit soft-cap (this model caps at 50)" in (
      capsys.readouterr().err)
  with pytest.raises(ValueError, match=r"model.attention='cudnn' on \w+: cuDNN computes in "
                     "bfloat16/float16, this model's attention in float32; use auto or xla"):
    pick("cudnn", dtype="float32")
  force_kernel("splash")
  with pytest.raises(ValueError, match="splash tiles rows in blocks of 128, these have 200 tokens"
                     r" \(set data.max_len to a multiple of 128\)"):
    pick("splash", length=200)
  assert pick("auto", length=200) == "xla"
