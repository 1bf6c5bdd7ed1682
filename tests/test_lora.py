"""LoRA against PEFT: logits, loss and gradients; PEFT adapter import/export; merge."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from jax_it import families, lora, model, train
from jax_it import reference as ref


def _our_grads(adapter, params, cfg, batch):
  b = train.add_loss_index(batch)
  loss_fn = lambda a: train.mean_loss(a, params, b, cfg, train.TrainConfig(loss_chunk=16))
  loss, grads = jax.value_and_grad(loss_fn)(adapter)
  return float(loss), grads


def _check_against_peft(pm, adapter, params, cfg, batch, logit_tol, grad_tol, tmp_path):
  tokens = batch["tokens"]
  ours = model.forward(params, jnp.asarray(tokens), cfg, lora=adapter)
  theirs = pm(torch.as_tensor(tokens, dtype=torch.long)).logits
  assert ref.rel_err(ours, theirs.detach().numpy()) <= logit_tol

  ref_loss = ref.masked_nll(theirs, batch["targets"], batch["loss_mask"])
  ref_loss.backward()
  loss, grads = _our_grads(adapter, params, cfg, batch)
  assert abs(loss - ref_loss.item()) / ref_loss.item() <= 1e-5

  # write our gradients in the PEFT layout to compare them tensor by tensor
  lora.save_peft(lora.Lora(grads.weights, adapter.cfg), cfg, str(tmp_path / "grads"))
  ours_g = load_file(str(tmp_path / "grads" / "adapter_model.safetensors"))
  theirs_g = ref.lora_grads(pm)
  assert set(ours_g) == set(theirs_g)
  errors = {k: ref.norm_rel_err(ours_g[k], theirs_g[k]) for k in theirs_g}
  assert max(errors.values()) <= grad_tol, errors


@pytest.mark.parametrize("vocab_block", [2048, 48])  # one block; 5 blocks and a 16-row tail
def test_peft_adapter_matches_on_tiny_gemma2(tiny, tmp_path, monkeypatch, vocab_block):
  monkeypatch.setattr("jax_it.loss.VOCAB_BLOCK", vocab_block)
  hf, params, cfg = tiny
  pm = ref.peft_model(hf, lora.ALL_LINEAR, r=4, alpha=8.0)
  try:
    pm.save_pretrained(tmp_path / "adapter")
    adapter = lora.load_peft(str(tmp_path / "adapter"), cfg)
    assert adapter.cfg.targets == lora.ALL_LINEAR and adapter.cfg.scale == 2.0
    batch = ref.random_batch(np.random.default_rng(0), 2, 20, cfg.vocab_size)
    _check_against_peft(pm, adapter, params, cfg, batch, 1e-5, 1e-4, tmp_path)
  finally:
    pm.unload()


def test_our_adapter_loads_in_peft(tiny, tmp_path):
  import peft

  hf, params, cfg = tiny
  lcfg = lora.LoraConfig(r=4, alpha=16.0, targets=("q_proj", "v_proj", "down_proj"),
                         rslora=True)
  adapter = lora.init(jax.random.key(0), cfg, lcfg)
  adapter = adapter.replace(weights=jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter.weights))
  lora.save_peft(adapter, cfg, str(tmp_path / "ours"))
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
  try:
    tokens = np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 12))
    theirs = pm(torch.as_tensor(tokens)).logits.detach().numpy()
    ours = model.forward(params, jnp.asarray(tokens, jnp.int32), cfg, lora=adapter)
    assert ref.rel_err(ours, theirs) <= 1e-5
    back = lora.load_peft(str(tmp_path / "ours"), cfg)
    assert back.cfg == adapter.cfg
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapter)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  finally:
    pm.unload()


def test_zero_b_is_the_base_model_and_merge_equals_adapter(tiny):
  _, params, cfg = tiny
  adapter = lora.init(jax.random.key(0), cfg, lora.LoraConfig(r=4, targets="all-linear"))
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, (2, 16)), jnp.int32)
  base = model.forward(params, tokens, cfg)
  np.testing.assert_array_equal(np.asarray(model.forward(params, tokens, cfg, lora=adapter)),
                                np.asarray(base))
  adapter = adapter.replace(weights=jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), adapter.weights))
  merged = model.forward(lora.merge(params, adapter), tokens, cfg)
  with_adapter = model.forward(params, tokens, cfg, lora=adapter)
  assert ref.rel_err(merged, with_adapter) <= 1e-5
  assert ref.rel_err(with_adapter, base) > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("target", lora.ALL_LINEAR)
def test_delta_from_the_projection_einsum_equals_x_times_merged_weight_delta(target):
  """lora_eqs derives x A and (x A) B from the base einsum; their product equals x applied to
  lora.delta (the W-shaped scale * A B that merge adds), through the base einsum itself."""
  cfg = model.ModelConfig("gemma2", 1, 32, embed_dim=8, hidden_dim=12, num_heads=4,
                          num_kv_heads=2, head_dim=3, query_pre_attn_scalar=3)
  adapter = lora.init(jax.random.key(0), cfg, lora.LoraConfig(r=2, alpha=6.0, targets=(target,)))
  adapter = adapter.replace(weights=jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(1), x.shape), adapter.weights))
  proj = families.PROJECTIONS[target]
  size = families.axis_sizes(cfg)
  x_axes = proj.eq.split(",")[0]
  x = jax.random.normal(jax.random.key(2), [{"B": 2, "T": 5, "S": 5}.get(a) or size[a]
                                            for a in x_axes])
  layer = lora.LayerAdapter(jax.tree.map(lambda w: w[0], adapter.weights), adapter.cfg.scale)
  ours = lora.add_delta(jnp.zeros(()), x, proj, layer, None)
  expected = jnp.einsum(proj.eq, x, lora.delta(adapter, target)[0])
  np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_bad_adapter_config(tmp_path, tiny):
  _, _, cfg = tiny
  (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8,'
                                                ' "target_modules": ["q_proj"],'
                                                ' "layers_to_transform": [0]}')
  with pytest.raises(ValueError, match="layers_to_transform"):
    lora.load_peft(str(tmp_path), cfg)
  with pytest.raises(ValueError, match="lora.targets=.*expected a non-empty list"):
    lora.LoraConfig(targets=("qkv",))


@contextlib.contextmanager
def _gemma3_peft(gemma3_torch, cfg, tmp_path):
  """(PEFT model, the same adapter loaded by us, a batch) on the real Gemma 3 270M; q, v, r=8."""
  pm = ref.peft_model(gemma3_torch, ("q_proj", "v_proj"), r=8, alpha=32.0, std=0.02)
  try:
    pm.save_pretrained(tmp_path / "adapter")
    adapter = lora.load_peft(str(tmp_path / "adapter"), cfg)
    yield pm, adapter, ref.random_batch(np.random.default_rng(0), 2, 48, 20_000)
  finally:
    pm.unload()


def test_peft_adapter_matches_on_gemma3_270m(gemma3_params, gemma3_torch, tmp_path):
  params, cfg = gemma3_params
  with _gemma3_peft(gemma3_torch, cfg, tmp_path) as (pm, adapter, batch):
    _check_against_peft(pm, adapter, params, cfg, batch, 1e-4, 1e-4, tmp_path)


def _grad_errors(grads: dict, reference: dict) -> dict:
  return {k: ref.norm_rel_err(grads[k], reference[k]) for k in reference}


def _bfloat16_against_autocast(pm, adapter, params, cfg, batch, tmp_path):
  """Loss and LoRA-gradient errors of our bfloat16 matmuls and of torch autocast, both against
  the float32 PEFT reference (float64 loss)."""
  tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
  out = {}
  for name, autocast in (("reference", False), ("autocast", True)):
    pm.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      logits = pm(tokens).logits
    loss = ref.masked_nll(logits.float(), batch["targets"], batch["loss_mask"])
    loss.backward()
    out[name] = (loss.item(), ref.lora_grads(pm))
  mixed = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  loss, grads = _our_grads(adapter, params, mixed, batch)
  lora.save_peft(lora.Lora(grads.weights, adapter.cfg), mixed, str(tmp_path / "mixed"))
  ours = (loss, load_file(str(tmp_path / "mixed" / "adapter_model.safetensors")))
  (ref_loss, ref_g), (auto_loss, auto_g) = out["reference"], out["autocast"]
  return ({"loss": abs(ours[0] - ref_loss) / ref_loss, **_grad_errors(ours[1], ref_g)},
          {"loss": abs(auto_loss - ref_loss) / ref_loss, **_grad_errors(auto_g, ref_g)})


def test_bfloat16_matmuls_are_as_close_to_float32_as_torch_autocast(gemma3_params, gemma3_torch,
                                                                    tmp_path):
  """model.matmul=bfloat16 (bfloat16 matmul inputs, float32 accumulation and elementwise math)
  against the float32 reference: no further from it than torch's own bfloat16 autocast."""
  params, cfg = gemma3_params
  with _gemma3_peft(gemma3_torch, cfg, tmp_path) as (pm, adapter, batch):
    ours, autocast = _bfloat16_against_autocast(pm, adapter, params, cfg, batch, tmp_path)
  # Measured: loss 1.0e-3 (autocast 3.8e-3); gradients 0.02-0.5 relative for both sides.
  assert ours["loss"] <= max(2 * autocast["loss"], 1e-4), (ours["loss"], autocast["loss"])
  ours_g = np.array([v for k, v in ours.items() if k != "loss"])
  auto_g = np.array([v for k, v in autocast.items() if k != "loss"])
  assert ours_g.min() > 1e-3  # the bfloat16 path really ran (float32 is ~1e-5 from reference)
  assert np.median(ours_g) <= 1.5 * np.median(auto_g), (np.median(ours_g), np.median(auto_g))
  assert ours_g.max() <= 2 * auto_g.max(), (ours_g.max(), auto_g.max())
