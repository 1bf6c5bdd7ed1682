"""Quantized bases: int8 (half the bytes of bfloat16) and NF4 (bitsandbytes' bits, a quarter of
the layer bytes), on the real 270M and on the Gemma 2 2B and 9B shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_it import config, families, lora, model, quant, train
from jax_it import reference as ref
from jax_it.ckpt.stack import to_matrix
from jax_it.families import PROJECTIONS
from jax_it.run import plan

TEXT = ("Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName three primary colors.\n\n### Response:"
        "Red, blue and yellow are the three primary colors of traditional color theory.")


def text_batch(gguf_path) -> dict:
  """TEXT as one row, loss on every token."""
  from jax_it import weights
  tok = weights.load_tokenizer(gguf_path)
  ids = np.asarray([tok.bos_token_id] + tok.encode(TEXT, add_special_tokens=False) +
                   [tok.eos_token_id])
  T = len(ids) - 1
  return train.add_loss_index({
      "tokens": ids[None, :-1], "targets": ids[None, 1:], "positions": np.arange(T)[None],
      "segment_ids": np.ones((1, T)), "loss_mask": np.ones((1, T))})


def test_int8_base_halves_memory_and_keeps_the_loss(gemma3_params, gemma3_gguf_path):
  params, cfg = gemma3_params
  batch = text_batch(gemma3_gguf_path)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  int8 = quant.quantize_int8(bf16)
  assert quant.nbytes(int8) <= 0.52 * quant.nbytes(bf16)
  loss_bf16 = float(train.mean_loss(None, bf16, batch, cfg))
  loss_int8 = float(train.mean_loss(None, int8, batch, cfg))
  assert loss_bf16 < 4.0  # real text: the model predicts it well
  assert abs(loss_int8 - loss_bf16) / loss_bf16 <= 0.01, (loss_int8, loss_bf16)
  # LoRA trains on top of the int8 base: gradients flow to the adapter only
  adapter = lora.init(jax.random.key(0), cfg, lora.LoraConfig(r=4))
  grads = jax.grad(lambda a: train.mean_loss(a, int8, batch, cfg))(adapter)
  assert float(jnp.abs(grads.weights["q_proj"]["b"]).max()) > 0
  # ... and with bfloat16 matmuls (int8 -> bfloat16 is exact; scales applied in float32)
  mixed = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  loss_mixed = float(train.mean_loss(None, int8, batch, mixed))
  assert abs(loss_mixed - loss_bf16) / loss_bf16 <= 0.01, (loss_mixed, loss_bf16)
  grads_mixed = jax.grad(lambda a: train.mean_loss(a, int8, batch, mixed))(adapter)
  for name in ("q_proj", "v_proj"):
    a, b = (np.asarray(g.weights[name]["b"], np.float64) for g in (grads_mixed, grads))
    assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b), name


def test_input_axes_come_from_projections():
  """The contracted axes of each stacked weight, derived from families.PROJECTIONS."""
  derived = {(p.block, p.param): quant.input_axes(p) for p in PROJECTIONS.values()}
  assert derived == {("attn", "q_einsum"): (2,),  # [L, N, D, H]
                     ("attn", "kv_einsum"): (3,),  # [L, 2, K, D, H]
                     ("attn", "attn_vec_einsum"): (1, 2),  # [L, N, H, D]
                     ("mlp", "gating_einsum"): (2,),  # [L, 2, D, F]
                     ("mlp", "linear"): (1,)}  # [L, F, D]


# ---------------------------------------------------------------------------------------------
# NF4

SMALL = dataclasses.replace(families.PRESETS["gemma2-tiny"], embed_dim=128, hidden_dim=320,
                            num_heads=4, num_kv_heads=2, head_dim=48, vocab_size=512)


def random_params(mcfg, seed: int = 0) -> dict:
  """model.init_params' tree for mcfg, filled by numpy (no compile per shape)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), mcfg))
  return jax.tree.map(lambda x: 0.02 * rng.standard_normal(x.shape, np.float32), shapes)


def layer_weight(tree, layer: int, part):
  """One layer's (and part's) slice of every leaf of a stacked weight or its scales."""
  return jax.tree.map(lambda x: x[layer] if part is None else x[layer, part], tree)


def test_nf4_matches_bitsandbytes():
  """Each projection's [out, in] matrix, quantized by bitsandbytes (CPU) and by quantize_nf4:
  without double quantization the same bytes and bit-identical weights. With it (here with the
  bfloat16 output of a bfloat16 base) the same 4-bit bytes, 256-block scales and offset up to
  float32 summation order; the 8-bit absmax codes are the nearest ones, where bitsandbytes' CPU
  search picks the other neighbour of a few values near a midpoint (its CUDA kernel rounds to
  the nearest), so those blocks move by one 8-bit step and all others are identical."""
  torch = pytest.importorskip("torch")
  bnb = pytest.importorskip("bitsandbytes.functional")
  params = random_params(SMALL)
  for x in jax.tree.leaves(params["layers"]):
    x[..., 3] *= 20.0  # outliers: a few blocks with a large absmax
  for dtype, tdtype, nested in ((jnp.float32, torch.float32, False),
                                (jnp.bfloat16, torch.bfloat16, True)):
    base = jax.tree.map(lambda x, dtype=dtype: jnp.asarray(x, dtype), params)
    nf4 = quant.quantize_nf4(base, dtype, 64, nested)
    codes_equal = codes_total = 0
    dequantize = jax.jit(quant.dequantize_nf4, static_argnums=2)  # the stack: [L, (part,) ...]
    for p in PROJECTIONS.values():
      w, q = base["layers"][p.block][p.param], nf4["layers"][p.block][p.param]
      whole = dequantize(q["w"], q["w_scale"], p.eq).astype(dtype)
      w, packed, scale, got = (layer_weight(t, 1, p.part)
                               for t in (w["w"], q["w"], q["w_scale"], whole))
      mat = torch.tensor(to_matrix(np.asarray(w, np.float32), p)).to(tdtype)
      bq, st = bnb.quantize_4bit(mat, blocksize=64, compress_statistics=nested,
                                 quant_type="nf4")
      want = bnb.dequantize_4bit(bq, st).float().numpy()
      got = to_matrix(np.asarray(got, np.float32), p)
      assert np.array_equal(to_matrix(np.asarray(packed), p).reshape(-1),
                            bq.numpy().reshape(-1)), p.name
      if not nested:
        assert np.array_equal(got, want), (p.name, dtype, np.abs(got - want).max())
        continue
      offset = float(scale["absmax_offset"])
      assert abs(offset - float(st.offset)) <= 1e-6 * abs(offset), p.name
      np.testing.assert_allclose(np.asarray(scale["absmax_scale"]), st.state2.absmax, rtol=1e-6)
      ours, theirs = np.asarray(scale["absmax"]).astype(int), st.absmax.numpy().astype(int)
      assert np.abs(ours - theirs).max() <= 1, p.name
      codes_equal, codes_total = codes_equal + (ours == theirs).sum(), codes_total + ours.size
      step = float(np.abs(np.asarray(w, np.float32)).max()) / 50
      assert np.abs(got - want).max() <= step, (p.name, np.abs(got - want).max(), step)
      if offset == float(st.offset):  # blocks whose absmax code agrees: identical weights
        same = np.repeat((ours == theirs).reshape(want.shape[0], -1), 64, axis=1)
        assert np.array_equal(got[same], want[same]), p.name
    if nested:
      assert codes_equal >= 0.99 * codes_total, (codes_equal, codes_total)


def test_nf4_code_book_and_double_quant_map_are_bitsandbytes():
  bnb = pytest.importorskip("bitsandbytes.functional")
  np.testing.assert_array_equal(quant.NF4, bnb.get_4bit_type("nf4", device="cpu").numpy())
  np.testing.assert_array_equal(quant.dynamic_code(), bnb.create_dynamic_map().numpy())


def test_nf4_base_keeps_the_loss_and_trains(gemma3_params, gemma3_gguf_path):
  """The real 270M in bfloat16 vs its NF4 base (bfloat16 matmuls, as configs/gemma2_9b_qlora).

  NF4 is lossier than its 2% target here: the loss rises ~6% and the LoRA gradients keep their
  norm but turn (cosine 0.6-0.8 against bfloat16's; int8: 0.996) - a 270M model read from a
  Q4_K_M file, rounded to 4 bits again. Those are NF4's own figures, not the decoding's: the
  same weights as dense bfloat16 (bitsandbytes' dequantized weights, test above) give the same
  loss and gradients, so the in-layer decoding and its backward pass are exact."""
  params, cfg = gemma3_params
  cfg = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  batch = text_batch(gemma3_gguf_path)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  nf4 = quant.quantize_nf4(bf16)
  assert quant.nbytes(nf4["layers"]) <= 0.27 * quant.nbytes(bf16["layers"])
  @jax.jit
  def densify(nf4):
    """The same weights as dense bfloat16 (the int8 embedding as its product)."""
    emb = nf4["embedder"]
    dense = {"embedder": {"input_embedding": emb["input_embedding"].astype(jnp.bfloat16)
                                             * emb["input_embedding_scale"]},
             "final_norm": nf4["final_norm"], "layers": jax.tree.map(lambda x: x, nf4["layers"])}
    for p in PROJECTIONS.values():  # the whole stack at once: [L, (part,) ...]
      d = nf4["layers"][p.block][p.param]
      w = quant.dequantize_nf4(d["w"], d["w_scale"], p.eq).astype(jnp.bfloat16)
      dense["layers"][p.block] = dict(dense["layers"][p.block], **{p.param: {"w": w}})
    return dense
  dense = densify(nf4)  # bf16's structure: its compile is reused below
  adapter = lora.init(jax.random.key(0), cfg,
                      lora.LoraConfig(r=4, targets=("q_proj", "v_proj", "down_proj")))
  step = jax.jit(jax.value_and_grad(lambda a, p: train.mean_loss(a, p, batch, cfg)))
  (loss_bf16, g_bf16), (loss_nf4, g_nf4) = step(adapter, bf16), step(adapter, nf4)
  loss_dense, g_dense = step(adapter, dense)
  loss_bf16, loss_nf4, loss_dense = float(loss_bf16), float(loss_nf4), float(loss_dense)
  assert loss_bf16 < 4.0
  assert abs(loss_nf4 - loss_bf16) / loss_bf16 <= 0.08, (loss_nf4, loss_bf16)
  # equal but for rounding: XLA may keep a decoded weight in float32 where dense rounds it
  assert abs(loss_nf4 - loss_dense) / loss_dense <= 2e-3, (loss_nf4, loss_dense)
  for name in g_bf16.weights:  # B = 0 at init: the gradient is B's
    nf4_b, bf16_b, dense_b = (np.asarray(g.weights[name]["b"], np.float64).ravel()
                              for g in (g_nf4, g_bf16, g_dense))
    assert np.isfinite(nf4_b).all(), name
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert abs(np.linalg.norm(nf4_b) / np.linalg.norm(bf16_b) - 1) <= 0.1, name
    assert cos(nf4_b, bf16_b) >= 0.4, (name, cos(nf4_b, bf16_b))
    assert cos(nf4_b, dense_b) >= 0.995, (name, cos(nf4_b, dense_b))


def test_nf4_base_is_about_a_quarter_of_bfloat16_for_gemma2_2b():
  """Bytes from shapes (jax.eval_shape of quantize_nf4 over the Gemma 2 2B preset in bfloat16):
  the layer weights 0.258 of bfloat16 (4 bits + 8-bit absmax per 64), the whole base 0.31 with
  its int8 embedding (a quarter of the 2B's parameters); the memory plan counts the same."""
  mcfg = families.PRESETS["gemma2-2b"]
  bf16 = jax.eval_shape(lambda: model.init_params(jax.random.key(0), mcfg, jnp.bfloat16))
  nbytes = {dq: quant.nbytes(jax.eval_shape(lambda p, dq=dq: quant.quantize_nf4(p, double_quant=dq),
                                            bf16)) for dq in (True, False)}
  nf4 = jax.eval_shape(quant.quantize_nf4, bf16)
  layers = [x for x in jax.tree.leaves(nf4["layers"]) if x.dtype != jnp.bfloat16]
  weights = [x for x in jax.tree.leaves(bf16["layers"]) if x.ndim > 2]
  ratio = quant.nbytes(layers) / quant.nbytes(weights)
  assert 0.255 <= ratio <= 0.26, ratio  # 4.125 bits and the 256-block scales
  assert 0.30 <= nbytes[True] / quant.nbytes(bf16) <= 0.32, nbytes[True] / quant.nbytes(bf16)
  assert nbytes[True] < nbytes[False] < 0.34 * quant.nbytes(bf16)  # float32 absmax: 4.5 bits
  cfg = config.load_config(None, ["model.quant=nf4", "model.dtype=bfloat16"])
  assert plan.nbytes(plan.abstract_params(cfg, mcfg)) == nbytes[True]
  # load_model's quantize_nf4 frees each bfloat16 weight once converted: the peak is the
  # bfloat16 base and at most the largest weight in flight (its nf4 output, one layer as bf16
  # slice, float32 copy and codes), well under int8's (a float32 copy of a whole weight)
  g = bf16["layers"]["mlp"]["gating_einsum"]["w"]
  in_flight = quant.nbytes(nf4["layers"]["mlp"]["gating_einsum"]) + 9 * g.size // g.shape[0]
  peak = plan.quantize_peak(cfg, mcfg)
  assert quant.nbytes(bf16) < peak <= quant.nbytes(bf16) + in_flight
  int8 = config.load_config(None, ["model.quant=int8", "model.dtype=bfloat16"])
  assert peak < plan.quantize_peak(int8, mcfg) - 2**30
  assert plan.quantize_where(cfg, "gpu") == "host" and plan.quantize_where(cfg, "cpu") != "host"


def test_nf4_refuses_a_block_that_does_not_divide_the_contracted_size():
  """One line naming the tensor, its contracted size, the block and what fits; from shapes."""
  mcfg = dataclasses.replace(SMALL, hidden_dim=96)  # down_proj contracts F = 96
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), mcfg))
  with pytest.raises(config.ConfigError) as e:
    jax.eval_shape(quant.quantize_nf4, shapes)
  msg = str(e.value)
  assert len(msg.splitlines()) == 1
  assert "layers/mlp/linear" in msg and "96" in msg and "nf4_block=64" in msg, msg
  assert "multiples of the block" in msg and "model.quant=int8" in msg, msg
  jax.eval_shape(lambda p: quant.quantize_nf4(p, block=32), shapes)  # 32 divides 96
  cfg = config.load_config(None, ["model.quant=nf4"])
  with pytest.raises(config.ConfigError, match="layers/mlp/linear"):
    plan.abstract_params(cfg, mcfg)  # `run.py plan` says it too, before compiling anything


def test_nf4_train_step_runs_and_exports_are_refused():
  """A full train step (remat, the loop's make_train_step) on an NF4 base moves the adapter;
  merging into it and GGUF export of its run are refused as for int8."""
  from jax_it.run import cli
  mcfg = dataclasses.replace(families.PRESETS["gemma2-tiny"], vocab_size=512)
  params = quant.quantize_nf4(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16),
                                           random_params(mcfg)))
  batch = train.add_loss_index(ref.random_batch(np.random.default_rng(0), 2, 16, 512))
  adapter = lora.init(jax.random.key(1), mcfg, lora.LoraConfig(r=4, targets="all-linear"))
  opt = train.make_optimizer(train.make_schedule(1e-2, 10))
  step = train.make_train_step(mcfg, opt, train.make_mesh(jax.devices()[:1]),
                               train.TrainConfig(loss_chunk=16), remat=True)
  new, _, metrics = step(adapter, opt.init(adapter), params, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert float(jnp.abs(new.weights["down_proj"]["b"]).max()) > 0
  with pytest.raises(ValueError, match="merge needs float base params"):
    lora.merge(params, new)
  cfg = config.load_config(None, ["model.quant=nf4"])
  with pytest.raises(cli.UsageError, match="model.quant='nf4'"):
    cli._check_gguf_quant(cfg, "runs/x")
