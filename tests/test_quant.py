"""int8 weight-only base: half the bytes of bfloat16, nearly the same loss on the real 270M."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_it import lora, quant, train
from jax_it.families import PROJECTIONS

TEXT = ("Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName three primary colors.\n\n### Response:"
        "Red, blue and yellow are the three primary colors of traditional color theory.")


def test_int8_base_halves_memory_and_keeps_the_loss(gemma3_params, gemma3_gguf_path):
  from jax_it import weights
  params, cfg = gemma3_params
  tok = weights.load_tokenizer(gemma3_gguf_path)
  ids = np.asarray([tok.bos_token_id] + tok.encode(TEXT, add_special_tokens=False) +
                   [tok.eos_token_id])
  T = len(ids) - 1
  batch = train.add_loss_index({
      "tokens": ids[None, :-1], "targets": ids[None, 1:], "positions": np.arange(T)[None],
      "segment_ids": np.ones((1, T)), "loss_mask": np.ones((1, T))})
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
