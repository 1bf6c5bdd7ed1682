"""DoRA (lora.dora, PEFT's use_dora) against PEFT: logits, loss, gradients, dropout in training,
PEFT adapter import/export, merge; an int8 base; bad adapter directories."""

import copy
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jax_it import families, lora, model, quant, train
from jax_it import reference as ref

# Jitted, so that the tests' many calls on the same shapes compile once (un-jitted, a scan
# compiles again on every call).
_forward = jax.jit(model.forward, static_argnames="cfg")


@functools.partial(jax.jit, static_argnames="cfg")
def _loss_and_grads(adapter, params, batch, cfg):
  loss_fn = lambda a: train.mean_loss(a, params, batch, cfg, train.TrainConfig(loss_chunk=16))
  return jax.value_and_grad(loss_fn)(adapter)


# The tiny model's adapter config and batch: the same in every test, so that the jitted
# forward and gradients compile once for all of them.
TINY_DORA = lora.LoraConfig(r=4, alpha=8.0, targets="all-linear", dora=True)


def _tiny_batch(seed=0):
  return ref.random_batch(np.random.default_rng(seed), 2, 20, 256)


def _our_grads(adapter, params, cfg, batch):
  loss, grads = _loss_and_grads(adapter, params, train.add_loss_index(batch), cfg=cfg)
  return float(loss), grads


def _as_peft(grads: lora.Lora, adapter: lora.Lora, cfg, out) -> dict:
  """Our gradients keyed and laid out as PEFT saves the adapter."""
  lora.save_peft(lora.Lora(grads.weights, adapter.cfg), cfg, str(out))
  return load_file(str(out / "adapter_model.safetensors"))


def _errors_against_peft(pm, adapter, params, cfg, batch, tmp_path) -> dict:
  """Relative errors of our logits, loss and every adapter gradient against PEFT's."""
  ours = _forward(params, jnp.asarray(batch["tokens"]), cfg=cfg, lora=adapter)
  theirs = pm(torch.as_tensor(batch["tokens"], dtype=torch.long)).logits
  ref_loss = ref.masked_nll(theirs, batch["targets"], batch["loss_mask"])
  ref_loss.backward()
  loss, grads = _our_grads(adapter, params, cfg, batch)
  ours_g, theirs_g = _as_peft(grads, adapter, cfg, tmp_path / "grads"), ref.adapter_grads(pm)
  assert set(ours_g) == set(theirs_g)
  assert any(k.endswith("lora_magnitude_vector") for k in theirs_g)
  grad_errors = {k: ref.norm_rel_err(ours_g[k], theirs_g[k]) for k in theirs_g}
  worst = {kind: max(v for k, v in grad_errors.items() if kind in k)
           for kind in ("lora_A", "lora_B", "lora_magnitude_vector")}
  errors = {"logits": ref.rel_err(ours, theirs.detach().numpy()),
            "loss": abs(loss - ref_loss.item()) / ref_loss.item(), **worst}
  print("errors against PEFT:", {k: f"{v:.1e}" for k, v in errors.items()})
  return errors


def test_peft_dora_adapter_matches_on_tiny_gemma2(tiny, tmp_path):
  """All-linear DoRA with random B and magnitudes: PEFT save_pretrained -> our load_peft gives
  PEFT's logits, loss and gradients of A, B and the magnitudes."""
  hf, params, cfg = tiny
  pm = ref.peft_dora_model(hf, lora.ALL_LINEAR, r=4, alpha=8.0)
  try:
    pm.save_pretrained(tmp_path / "adapter")
    adapter = lora.load_peft(str(tmp_path / "adapter"), cfg)
    assert adapter.cfg.dora and adapter.cfg.targets == lora.ALL_LINEAR
    assert adapter.weights["q_proj"]["m"].shape == (cfg.num_layers, cfg.num_heads, cfg.head_dim)
    assert adapter.cfg == TINY_DORA
    batch = _tiny_batch()
    # DoRA really differs from plain LoRA: the factor m / ||W + s B A|| is far from 1
    w, proj = adapter.weights["q_proj"], families.PROJECTIONS["q_proj"]
    dense = lora.dense_weight({"w": params["layers"]["attn"]["q_einsum"]["w"][0]}, proj)
    norm = lora.weight_norm(dense, w["a"][0], w["b"][0], adapter.cfg.scale, proj)
    assert float(jnp.abs(w["m"][0] / norm - 1.0).max()) > 0.1
    errors = _errors_against_peft(pm, adapter, params, cfg, batch, tmp_path)
  finally:
    pm.unload().eval()
  # measured: logits 4e-7, loss 1e-7, gradients <= 1e-6
  assert errors["logits"] <= 1e-5 and errors["loss"] <= 1e-5, errors
  assert max(errors[k] for k in ("lora_A", "lora_B", "lora_magnitude_vector")) <= 1e-4, errors


def test_peft_dora_adapter_matches_on_gemma3_270m(gemma3_params, gemma3_torch, tmp_path):
  params, cfg = gemma3_params
  pm = ref.peft_dora_model(gemma3_torch, ("q_proj", "v_proj"), r=8, alpha=32.0, std=0.02)
  try:
    pm.save_pretrained(tmp_path / "adapter")
    adapter = lora.load_peft(str(tmp_path / "adapter"), cfg)
    batch = ref.random_batch(np.random.default_rng(0), 1, 32, 20_000)
    errors = _errors_against_peft(pm, adapter, params, cfg, batch, tmp_path)
  finally:
    pm.unload()
  # measured: logits 8e-6, loss 8e-8, gradients <= 7e-5 (A 5e-5, B 5e-5, m 7e-5): the float32
  # floor of this model, where plain LoRA's gradients err by up to 8e-5 too
  assert errors["logits"] <= 1e-4 and errors["loss"] <= 1e-5, errors
  assert max(errors[k] for k in ("lora_A", "lora_B", "lora_magnitude_vector")) <= 1e-4, errors


def _random_dora(params, cfg, lcfg=TINY_DORA, seed=0) -> lora.Lora:
  """A DoRA adapter of ours with B nonzero and the magnitudes moved off ||W|| (numpy noise:
  eager jax.random would compile once per shape)."""
  adapter = lora.init(jax.random.key(seed), cfg, lcfg, params=params)
  rng = np.random.default_rng(seed)
  noise = lambda x: rng.standard_normal(x.shape, np.float32)  # noqa: E731
  return adapter.replace(weights={t: {
      "a": w["a"], "b": jnp.asarray(0.05 * noise(w["b"])),
      "m": w["m"] * jnp.asarray(1.0 + 0.1 * noise(w["m"]))} for t, w in adapter.weights.items()})


def test_our_dora_adapter_loads_in_peft_and_back(tiny, tmp_path):
  import peft

  hf, params, cfg = tiny
  adapter = _random_dora(params, cfg)
  lora.save_peft(adapter, cfg, str(tmp_path / "ours"))
  config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
  assert config["use_dora"] is True
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
  try:
    tokens = _tiny_batch(1)["tokens"]
    theirs = pm(torch.as_tensor(tokens, dtype=torch.long)).logits.detach().numpy()
  finally:
    pm.unload().eval()
  ours = _forward(params, jnp.asarray(tokens), cfg=cfg, lora=adapter)
  assert ref.rel_err(ours, theirs) <= 1e-5
  back = lora.load_peft(str(tmp_path / "ours"), cfg)
  assert back.cfg == adapter.cfg
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapter)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fresh_dora_is_the_base_model(tiny):
  """m = ||W|| and B = 0 at init: the output is the base model's, as in PEFT."""
  _, params, cfg = tiny
  adapter = lora.init(jax.random.key(0), cfg, TINY_DORA, params=params)
  tokens = jnp.asarray(_tiny_batch(2)["tokens"])
  base = _forward(params, tokens, cfg=cfg)
  assert ref.rel_err(_forward(params, tokens, cfg=cfg, lora=adapter), base) <= 1e-6
  with pytest.raises(ValueError, match="lora.dora=true: lora.init needs the base params"):
    lora.init(jax.random.key(0), cfg, lora.LoraConfig(dora=True))


def _hf_layout(w, target: str) -> np.ndarray:
  """One layer's weight [*weight_axes] as transformers stores it: [out, in], axes flattened."""
  proj = families.PROJECTIONS[target]
  w = np.asarray(jnp.einsum(f"{proj.weight_axes}->{proj.out_axes}{proj.in_axes}", w))
  n_out = math.prod(w.shape[:len(proj.out_axes)])
  return w.reshape(n_out, -1)


def test_merge_equals_peft_merge_and_unload(tiny, tmp_path):
  hf, params, cfg = tiny
  pm = ref.peft_dora_model(copy.deepcopy(hf), lora.ALL_LINEAR, r=4, alpha=8.0)
  pm.save_pretrained(tmp_path / "adapter")
  adapter = lora.load_peft(str(tmp_path / "adapter"), cfg)
  merged_hf = pm.merge_and_unload()
  merged = lora.merge(params, adapter)
  errors = {}
  for target, proj in families.PROJECTIONS.items():
    w = merged["layers"][proj.block][proj.param]["w"]
    for layer in range(cfg.num_layers):
      ours = _hf_layout(w[layer] if proj.part is None else w[layer, proj.part], target)
      theirs = merged_hf.get_submodule(f"model.layers.{layer}.{proj.hf}").weight.detach().numpy()
      errors[f"{layer}.{target}"] = ref.rel_err(ours, theirs)
  tokens = _tiny_batch(3)["tokens"]
  with torch.no_grad():
    theirs = merged_hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  ours = _forward(merged, jnp.asarray(tokens), cfg=cfg)
  with_adapter = _forward(params, jnp.asarray(tokens), cfg=cfg, lora=adapter)
  print("merge errors: weights", f"{max(errors.values()):.1e}",
        "logits", f"{ref.rel_err(ours, theirs):.1e}")
  assert max(errors.values()) <= 1e-5, errors
  assert ref.rel_err(ours, theirs) <= 1e-5
  assert ref.rel_err(ours, with_adapter) <= 1e-5


def test_decoding_folds_the_norms_once_and_generates_as_the_merged_model(tiny):
  """sample.generate folds g = m / ||W + s A B|| into the adapter once per call (fold_norms);
  the folded adapter gives the unfolded logits, and greedy tokens equal the merged model's."""
  from jax_it import sample
  _, params, cfg = tiny
  adapter = _random_dora(params, cfg)
  folded = lora.fold_norms(adapter, params)
  assert all(set(w) == {"a", "b", "g"} for w in folded.weights.values())
  tokens = jnp.asarray(_tiny_batch(4)["tokens"])
  assert ref.rel_err(_forward(params, tokens, cfg=cfg, lora=folded),
                     _forward(params, tokens, cfg=cfg, lora=adapter)) <= 1e-6
  prompts = [[5, 9, 17, 3], [40, 2, 8]]
  got = sample.generate(params, cfg, prompts, lora=adapter, max_new_tokens=8, eos_id=None)
  want = sample.generate(lora.merge(params, adapter), cfg, prompts, max_new_tokens=8,
                         eos_id=None)
  assert got == want


class _FixedDropout(torch.nn.Module):
  """A dropout that applies a given mask (already scaled by 1 / (1 - p))."""

  def __init__(self, mask):
    super().__init__()
    self.mask = mask

  def forward(self, x):
    return x * self.mask


def _our_dropout_masks(key, cfg, p: float, batch: int, length: int) -> dict:
  """The masks add_delta draws per (layer, projection), as [B, T, in_features] torch tensors."""
  size = dict(families.axis_sizes(cfg), B=batch, T=length, S=length)

  @jax.jit  # one compile, not one per mask shape
  def draw(key):
    masks = {}
    for layer, layer_key in enumerate(jax.random.split(key, cfg.num_layers)):
      for salt, (name, proj) in enumerate(families.PROJECTIONS.items()):
        shape = [size[a] for a in proj.eq.split(",")[0]]
        keep = jax.random.bernoulli(jax.random.fold_in(layer_key, salt), 1.0 - p, shape)
        masks[f"{layer}.{name}"] = jnp.where(keep, 1.0 / (1.0 - p), 0.0).astype(jnp.float32)
    return masks

  return {(int(k.split(".")[0]), k.split(".")[1]): torch.as_tensor(
      np.asarray(m).reshape(batch, length, -1)) for k, m in draw(key).items()}


def test_dropout_in_training_follows_peft(tiny, tmp_path):
  """PEFT in training mode with dropout computes the base output again from the dropped input:
  y + (g - 1) W dropout(x) + g s B A dropout(x). Our masks injected into PEFT's dropout layers
  give the same logits (the gradients are autodiff's of that; their check, without dropout,
  is above)."""
  hf, params, cfg = tiny
  p, key = 0.3, jax.random.key(7)
  batch = _tiny_batch(4)
  B, T = batch["tokens"].shape
  pm = ref.peft_dora_model(hf, lora.ALL_LINEAR, r=4, alpha=8.0, dropout=p)
  try:
    pm.save_pretrained(tmp_path / "adapter")
    adapter = lora.load_peft(str(tmp_path / "adapter"), cfg)
    assert adapter.cfg.dropout == p
    for (layer, name), mask in _our_dropout_masks(key, cfg, p, B, T).items():
      module = pm.base_model.model.model.layers[layer].get_submodule(
          families.PROJECTIONS[name].hf)
      module.lora_dropout["default"] = _FixedDropout(mask)
    pm.eval()  # get_peft_model leaves the model in training mode
    with torch.no_grad():
      eval_logits = pm(torch.as_tensor(batch["tokens"], dtype=torch.long)).logits.numpy()
    pm.train()
    with torch.no_grad():
      theirs = pm(torch.as_tensor(batch["tokens"], dtype=torch.long)).logits.numpy()
  finally:
    pm.unload().eval()
  tokens = jnp.asarray(batch["tokens"])
  ours = jax.jit(lambda a: model.logits_from_hidden(
      params, model.hidden_states(params, tokens, cfg, lora=a, dropout_key=key), cfg))(adapter)
  print(f"dropout in training: logits {ref.rel_err(ours, theirs):.1e}")
  assert ref.rel_err(ours, eval_logits) > 1e-2  # dropout really applied
  assert ref.rel_err(ours, theirs) <= 1e-5


def test_int8_base_trains_and_stays_near_float(tiny):
  """DoRA on an int8 base: the norms read the dequantized weights; loss and gradients stay near
  the float base's and SGD steps lower the loss. bfloat16 matmuls stay near float32 too."""
  _, params, cfg = tiny
  int8 = quant.quantize_int8(params, jnp.float32)
  adapter = _random_dora(params, cfg)
  fresh8 = lora.init(jax.random.key(0), cfg, adapter.cfg, params=int8)
  fresh = lora.init(jax.random.key(0), cfg, adapter.cfg, params=params)
  for t in lora.ALL_LINEAR:  # m = ||dequantized W||, near ||W||
    assert ref.rel_err(fresh8.weights[t]["m"], fresh.weights[t]["m"]) <= 1e-2, t
  batch = _tiny_batch()
  loss, grads = _our_grads(adapter, params, cfg, batch)
  loss8, grads8 = _our_grads(adapter, int8, cfg, batch)
  errors = {f"{t}.{k}": ref.norm_rel_err(grads8.weights[t][k], grads.weights[t][k])
            for t in lora.ALL_LINEAR for k in ("a", "b", "m")}
  tokens = jnp.asarray(batch["tokens"])
  mixed = _forward(params, tokens, cfg=dataclasses.replace(cfg, matmul_dtype="bfloat16"),
                   lora=adapter)
  mixed_err = ref.rel_err(mixed, _forward(params, tokens, cfg=cfg, lora=adapter))
  print(f"int8 base: loss {abs(loss8 - loss) / loss:.1e}, gradients <= "
        f"{max(errors.values()):.1e}; bfloat16 matmuls: logits {mixed_err:.1e}")
  assert abs(loss8 - loss) / loss <= 1e-2 and max(errors.values()) <= 0.1, (loss8, loss, errors)
  # measured 1.8e-2, as plain LoRA with the same A, B (1.8e-2) and the base alone (7e-3)
  assert 1e-5 < mixed_err <= 3e-2
  sgd = jax.jit(lambda a, g: jax.tree.map(lambda x, d: x - 0.5 * d, a, g))
  losses = [loss8]
  for _ in range(2):
    adapter = sgd(adapter, grads8)
    value, grads8 = _our_grads(adapter, int8, cfg, batch)
    losses.append(value)
  assert losses[2] < losses[1] < losses[0], losses


def _write_config(path, **overrides):
  path.mkdir(exist_ok=True)
  config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
            "use_dora": True, **overrides}
  (path / "adapter_config.json").write_text(json.dumps(config))


def test_bad_dora_adapters(tiny, tmp_path):
  _, params, cfg = tiny
  adapter = _random_dora(params, cfg, dataclasses.replace(TINY_DORA, targets=("q_proj",)))
  lora.save_peft(adapter, cfg, str(tmp_path / "ours"))
  file = tmp_path / "ours" / "adapter_model.safetensors"
  tensors = load_file(str(file))
  key = "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
  want = (cfg.num_heads * cfg.head_dim,)
  save_file({**tensors, key: np.zeros((7,), np.float32)}, str(file))
  with pytest.raises(ValueError) as e:
    lora.load_peft(str(tmp_path / "ours"), cfg)
  assert str(e.value) == f"{file}: {key} has shape (7,), expected {want}"
  # a magnitude in an adapter that is not DoRA, and a DoRA adapter without its magnitudes
  save_file(tensors, str(file))
  _write_config(tmp_path / "ours", use_dora=False)
  with pytest.raises(ValueError, match=f"{file}: unexpected tensor .*lora_magnitude_vector"):
    lora.load_peft(str(tmp_path / "ours"), cfg)
  save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(file))
  _write_config(tmp_path / "ours")
  with pytest.raises(ValueError, match=f"{file}: q_proj is missing tensors"):
    lora.load_peft(str(tmp_path / "ours"), cfg)
  # what PEFT has and we do not: DoRA on the embedding, with a LoRA bias, layer patterns
  conf = tmp_path / "bad" / "adapter_config.json"
  for overrides, message in (
      ({"target_modules": ["q_proj", "embed_tokens"]},
       r"target_modules \['embed_tokens'\] with use_dora are not supported"),
      ({"lora_bias": True}, "lora_bias=True is not supported"),
      ({"layers_to_transform": [0]}, r"layers_to_transform=\[0\] is not supported")):
    _write_config(tmp_path / "bad", **overrides)
    with pytest.raises(ValueError, match=f"^{conf}: {message}"):
      lora.load_peft(str(tmp_path / "bad"), cfg)


def test_nf4_base_reads_the_dequantized_weights(tiny):
  """DoRA on an NF4 base (blocks of 32, double-quantized scales): m starts at the row norms of
  the dequantized weights, the folded decoding adapter gives the same logits, the loss stays
  near the float base's and every gradient is finite."""
  _, params, cfg = tiny
  nf4 = quant.quantize_nf4(params, jnp.float32, 32, True)
  fresh = lora.init(jax.random.key(0), cfg, TINY_DORA, params=nf4)
  for t in lora.ALL_LINEAR:
    proj = families.PROJECTIONS[t]
    d = nf4["layers"][proj.block][proj.param]
    w = jax.vmap(lambda dl, p=proj: lora.dense_weight(dl, p))(d)
    axes = tuple(1 + proj.weight_axes.index(c) for c in proj.in_axes)
    assert ref.rel_err(fresh.weights[t]["m"], jnp.sqrt(jnp.sum(w * w, axis=axes))) <= 1e-6, t
  adapter = _random_dora(nf4, cfg)
  tokens = jnp.asarray(_tiny_batch()["tokens"])
  assert ref.rel_err(_forward(nf4, tokens, cfg=cfg, lora=lora.fold_norms(adapter, nf4)),
                     _forward(nf4, tokens, cfg=cfg, lora=adapter)) <= 1e-6
  loss4, grads4 = _our_grads(adapter, nf4, cfg, _tiny_batch())
  loss, _ = _our_grads(_random_dora(params, cfg), params, cfg, _tiny_batch())
  assert abs(loss4 - loss) / loss <= 0.05, (loss4, loss)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads4.weights))
