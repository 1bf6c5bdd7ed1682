"""Checkpoint readers and writers: HF, GGUF and Flax/orbax layouts, dtypes and bad input."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jax_it import families, model, reference, weights
from jax_it.ckpt import flax as ckpt_flax
from jax_it.ckpt import hf as ckpt_hf
from jax_it.ckpt import tokenizer as ckpt_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
ocp = pytest.importorskip("orbax.checkpoint")

# narrower than reference.TINY, two layers: the loaders' tests need many checkpoints, fast
SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, num_hidden_layers=2)


def _tiny_hf(kind="gemma2", **overrides):
  return reference.tiny_hf(kind, **{**SMALL, **overrides})


def _assert_same(a, b):
  """Bit-exact equality of two param trees (structure, dtype and values)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _logits(m, tokens):
  with torch.no_grad():
    return m(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  m = _tiny_hf("gemma2")
  path = tmp_path_factory.mktemp("hf")
  m.save_pretrained(path)
  return m, path


# ---------------------------------------------------------------------------------------------
# Hugging Face


def test_hf_sharded_equals_single_file(hf_dir, tmp_path):
  m, path = hf_dir
  m.save_pretrained(tmp_path, max_shard_size="8KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  single, cfg1 = weights.load(path)
  sharded, cfg2 = weights.load(tmp_path)
  assert cfg1 == cfg2
  _assert_same(single, sharded)


def test_bfloat16_load(hf_dir):
  _, path = hf_dir
  f32, _ = weights.load(path)
  bf16, _ = weights.load(path, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))
  _assert_same(jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32), bf16)


def test_bfloat16_safetensors_file(tmp_path):
  m = _tiny_hf("gemma3")
  with torch.no_grad():
    for p in m.parameters():
      p.copy_(p.bfloat16().float())  # bf16-representable, so both files hold the same values
  m.save_pretrained(tmp_path / "f32")
  m.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  _assert_same(weights.load(tmp_path / "f32")[0], weights.load(tmp_path / "bf16")[0])


@pytest.mark.parametrize("kind", ["gemma1", "gemma2", "gemma3"])
def test_hf_load_then_export_gives_the_same_transformers_model(kind, tmp_path):
  m = _tiny_hf(kind)
  m.save_pretrained(tmp_path / "in")
  params, cfg = weights.load(tmp_path / "in")
  ckpt_hf.save_hf(params, cfg, str(tmp_path / "out"))  # query_pre_attn_scalar read as a float
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                            attn_implementation="eager")
  tokens = [[2, 5, 7, 9, 11, 13, 3, 4, 40, 41]]
  np.testing.assert_array_equal(_logits(again.eval(), tokens), _logits(m, tokens))


def test_hf_multimodal_gemma3_config_uses_text_config():
  text = {"hidden_size": 16, "intermediate_size": 24, "model_type": "gemma3_text",
          "num_hidden_layers": 12, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
          "sliding_window": 1024}
  cfg = weights.hf_config_to_model({"model_type": "gemma3", "text_config": text}, 64)
  assert cfg.family == "gemma3" and cfg.num_heads == 8 and cfg.num_kv_heads == 4
  assert cfg.rope_scale_global == 8.0 and cfg.rope_base_global == 1e6
  assert cfg.local_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,)


# ---------------------------------------------------------------------------------------------
# The family table: one source for configs, readers and writers


@pytest.mark.parametrize("name", sorted(families.PRESETS))
def test_preset_round_trips_through_hf_config(name):
  """Export writes a config.json from the table; the reader maps it back to the same config."""
  preset = families.PRESETS[name]
  d = ckpt_hf.hf_config(preset).to_dict()
  assert d["model_type"] == families.FAMILIES[preset.family].hf_types[0]
  assert weights.hf_config_to_model(d, preset.vocab_size) == preset


def _official_shapes(cfg):
  """Shapes of the official flat Flax layout of cfg (no arrays)."""
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  out = {}
  for k, s in traverse_util.flatten_dict(shapes, sep="/").items():
    if not k.startswith("layers/"):
      out[k] = s.shape
      continue
    shape = s.shape[1:]
    if k == "layers/mlp/gating_einsum/w" and cfg.transposed_gating:
      shape = (2, cfg.hidden_dim, cfg.embed_dim)
    out.update({f"layer_{i}/{k[len('layers/'):]}": shape for i in range(cfg.num_layers)})
  return out


OFFICIAL = {**{k: v for k, v in families.PRESETS.items() if k != "gemma2-tiny"},
            "gemma3-4b": families.gemma3_config(34, 2560, 10240, 8, 4, rope_scale_global=8.0),
            "gemma3-27b": dataclasses.replace(families.gemma3_config(62, 5376, 21504, 32, 16, 128,
                                                                     rope_scale_global=8.0),
                                              query_pre_attn_scalar=168)}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_configs_from_flax_shapes_alone(name):
  """A Kaggle checkpoint has shapes only: the table's per-model facts (window, RoPE scale, query
  scale, gating layout) recover the official config."""
  cfg = OFFICIAL[name]
  assert ckpt_flax._config(_official_shapes(cfg), None, Path(name)) == cfg


# ---------------------------------------------------------------------------------------------
# GGUF


def _write_gguf(m, path, arch="gemma2"):
  """A float32 GGUF as llama.cpp's converter writes it: its names, norms stored as 1 + w."""
  c = m.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(128)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_sliding_window(c.sliding_window)
  w.add_attn_logit_softcapping(c.attn_logit_softcapping)
  w.add_final_logit_softcapping(c.final_logit_softcapping)
  names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
           "post_attention_layernorm": "post_attention_norm",
           "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
  for name, p in m.state_dict().items():
    x = p.float().numpy()
    if name == "model.embed_tokens.weight":
      w.add_tensor("token_embd.weight", x)
    elif name == "model.norm.weight":
      w.add_tensor("output_norm.weight", x + 1)
    elif name.startswith("model.layers."):
      i, rest = name[len("model.layers."):].split(".", 1)
      short = names[rest.removesuffix(".weight")]
      w.add_tensor(f"blk.{i}.{short}.weight", x + 1 if "norm" in short else x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
  # llama.cpp has no key for the query scale: it assumes head_dim (D / N for the 27B models)
  m = _tiny_hf("gemma2", sliding_window=4, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
               query_pre_attn_scalar=8)
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  _write_gguf(m, path)
  return m, path


def test_gguf_gemma2_matches_transformers(gguf_file):
  m, path = gguf_file
  params, cfg = weights.load(path)
  assert (cfg.family, cfg.sliding_window, cfg.attn_logits_soft_cap) == ("gemma2", 4, 3.0)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 10))
  ref = _logits(m, tokens)
  out = np.asarray(model.forward(params, jnp.asarray(tokens), cfg))
  assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_gguf_bfloat16(gguf_file):
  _, path = gguf_file
  f32, _ = weights.load(path)
  bf16, _ = weights.load(path, dtype=jnp.bfloat16)
  _assert_same(jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32), bf16)


def test_real_gguf_norms_are_offsets(gemma3_params):
  params, cfg = gemma3_params
  assert cfg.family == "gemma3" and cfg.vocab_size == 262_144
  # stored as 1 + w by llama.cpp; the trained offsets sit well away from -1
  assert float(jnp.min(params["final_norm"]["scale"])) > -1.0
  assert params["layers"]["mlp"]["gating_einsum"]["w"].shape == (18, 2, 640, 2048)


# ---------------------------------------------------------------------------------------------
# Flax / orbax


@pytest.mark.parametrize("kind,dtype", [("gemma3", jnp.float32), ("gemma2", jnp.bfloat16),
                                        ("gemma1", jnp.float32)])
def test_flax_save_load_round_trip(kind, dtype, tmp_path):
  m = _tiny_hf(kind)
  m.save_pretrained(tmp_path / "hf")
  params, cfg = weights.load(tmp_path / "hf", dtype=dtype)
  weights.save(params, cfg, tmp_path / "flax")
  params2, cfg2 = weights.load(tmp_path / "flax", dtype=dtype)
  assert cfg2 == cfg
  _assert_same(params, params2)


def _raw(path):
  return ocp.PyTreeCheckpointer().restore(path.absolute())


def _save_raw(tree, path):
  ocp.PyTreeCheckpointer().save(path.absolute(), tree)


def test_flax_on_disk_layout_is_official(tmp_path):
  m = _tiny_hf("gemma3")
  m.save_pretrained(tmp_path / "hf")
  params, cfg = weights.load(tmp_path / "hf")
  weights.save(params, cfg, tmp_path / "flax")
  raw = _raw(tmp_path / "flax")
  D, F, N, K, H = 16, 24, 2, 1, 8
  assert raw["transformer/layer_1/attn/q_einsum"]["w"].shape == (N, D, H)
  assert raw["transformer/layer_1/attn/kv_einsum"]["w"].shape == (2, K, D, H)
  assert raw["transformer/layer_1/attn/attn_vec_einsum"]["w"].shape == (N, H, D)
  assert raw["transformer/layer_1/mlp/gating_einsum"]["w"].shape == (2, F, D)  # Gemma 3: [2, F, D]
  assert raw["transformer/layer_1/mlp/linear"]["w"].shape == (F, D)
  assert raw["transformer/layer_0/attn/_query_norm"]["scale"].shape == (H,)
  assert raw["transformer/embedder"]["input_embedding"].shape == (64, D)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("kind", ["gemma1", "gemma2", "gemma3"])
def test_flax_kaggle_layout_without_metadata(kind, nested, tmp_path):
  """A checkpoint as Kaggle ships it: flat or nested keys, no jax_it.json; config from shapes."""
  m = _tiny_hf(kind)
  m.save_pretrained(tmp_path / "hf")
  params, cfg = weights.load(tmp_path / "hf")
  weights.save(params, cfg, tmp_path / "ours")
  tree = _raw(tmp_path / "ours")
  if nested:
    tree = traverse_util.unflatten_dict(traverse_util.flatten_dict(tree, sep="/"), sep="/")
  _save_raw(tree, tmp_path / "kaggle" / "ckpt")  # the checkpoint in a subdirectory, as on Kaggle
  loaded, inferred = weights.load(tmp_path / "kaggle")
  _assert_same(params, loaded)
  assert inferred.family == cfg.family and inferred.transposed_gating == cfg.transposed_gating
  assert (inferred.num_heads, inferred.num_kv_heads, inferred.head_dim) == (2, 1, 8)


def test_flax_qkv_einsum_when_kv_heads_equal_heads(tmp_path):
  m = _tiny_hf("gemma1", num_key_value_heads=2)
  m.save_pretrained(tmp_path / "hf")
  params, cfg = weights.load(tmp_path / "hf")
  weights.save(params, cfg, tmp_path / "flax")
  raw = _raw(tmp_path / "flax")
  assert raw["transformer/layer_0/attn/qkv_einsum"]["w"].shape == (3, 2, 16, 8)
  assert "transformer/layer_0/attn/q_einsum" not in raw
  (tmp_path / "flax" / weights.META_FILE).unlink()
  loaded, inferred = weights.load(tmp_path / "flax")
  _assert_same(params, loaded)
  assert inferred.num_kv_heads == inferred.num_heads == 2


@pytest.mark.parametrize("transposed", [False, True])
def test_flax_gating_layout_inferred_from_shapes(transposed, hf_dir, tmp_path):
  _, path = hf_dir
  params, cfg = weights.load(path)
  cfg = dataclasses.replace(cfg, transposed_gating=transposed)
  weights.save(params, cfg, tmp_path / "flax")
  shape = _raw(tmp_path / "flax")["transformer/layer_0/mlp/gating_einsum"]["w"].shape
  assert shape == ((2, 24, 16) if transposed else (2, 16, 24))
  (tmp_path / "flax" / weights.META_FILE).unlink()
  loaded, inferred = weights.load(tmp_path / "flax")
  assert inferred.transposed_gating == transposed
  _assert_same(params, loaded)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_tokenizers(gemma3_gguf_path, hf_dir, tmp_path):
  tok = weights.load_tokenizer(gemma3_gguf_path)
  assert weights.load_tokenizer(gemma3_gguf_path) is tok  # cached
  ids = tok("Hello world").input_ids
  assert ids[0] == 2 and len(ids) > 2  # BOS first
  tok.save_pretrained(tmp_path)
  shutil.copy(hf_dir[1] / "config.json", tmp_path / "config.json")
  assert weights.load_tokenizer(tmp_path)("Hello world").input_ids == ids


def test_gguf_tokenizer_cache_encodes_like_a_fresh_build(gemma3_gguf_path, tmp_path, monkeypatch):
  from transformers import AutoTokenizer
  monkeypatch.setenv("JAX_IT_CACHE", str(tmp_path))
  path = Path(gemma3_gguf_path)
  fresh = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  ckpt_tokenizer.gguf_tokenizer(path)  # builds and saves the cache entry
  assert len(list((tmp_path / "tokenizers").iterdir())) == 1
  cached = ckpt_tokenizer.gguf_tokenizer(path)  # now read from the cache
  text = "Below is an instruction.\n\n### Input:\nÜber 3.5 Äpfel, 東京 🍎 <b>x</b>\t  end"
  assert cached.encode(text) == fresh.encode(text)
  assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id) == (2, 1, 0)


def test_flax_tokenizer_model_beside_checkpoint(hf_dir, tmp_path):
  spm = pytest.importorskip("sentencepiece")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["hello world this is a test", "the quick brown fox jumps"] * 50),
      vocab_size=40, model_type="bpe", model_prefix=str(tmp_path / "tokenizer"), minloglevel=2)
  params, cfg = weights.load(hf_dir[1])
  weights.save(params, cfg, tmp_path / "ckpt")
  assert len(weights.load_tokenizer(tmp_path / "ckpt")("hello").input_ids) >= 1


# ---------------------------------------------------------------------------------------------
# Bad input


def _one_line_error(path, match):
  with pytest.raises(weights.CheckpointError, match=match) as e:
    weights.load(path)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_missing_path():
  _one_line_error("/no/such/checkpoint/dir", "no such file")


def test_hub_id_unreachable(monkeypatch):
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  _one_line_error("google/gemma-nonexistent-xyz", "google/gemma-nonexistent-xyz.*hub")


def test_directory_of_no_format(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  _one_line_error(tmp_path, "not a checkpoint")


def test_file_that_is_not_gguf(tmp_path):
  (tmp_path / "weights.bin").write_bytes(b"\0" * 100)
  _one_line_error(tmp_path / "weights.bin", "not a GGUF file")


def test_hf_dir_without_weights(hf_dir, tmp_path):
  shutil.copy(hf_dir[1] / "config.json", tmp_path)
  _one_line_error(tmp_path, "model.safetensors")


def test_hf_non_gemma_model_type(hf_dir, tmp_path):
  shutil.copy(hf_dir[1] / "model.safetensors", tmp_path)
  conf = json.loads((hf_dir[1] / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**conf, "model_type": "llama"}))
  _one_line_error(tmp_path, "config.json.*not a Gemma")


@pytest.mark.parametrize("fraction", [0.0001, 0.5])
def test_truncated_safetensors(hf_dir, tmp_path, fraction):
  data = (hf_dir[1] / "model.safetensors").read_bytes()
  shutil.copy(hf_dir[1] / "config.json", tmp_path)
  (tmp_path / "model.safetensors").write_bytes(data[:max(8, int(len(data) * fraction))])
  _one_line_error(tmp_path, "model.safetensors")


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.999])
def test_truncated_gguf(gguf_file, tmp_path, fraction):
  data = gguf_file[1].read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[:int(len(data) * fraction)])
  _one_line_error(tmp_path / "cut.gguf", "cut.gguf.*GGUF")


def test_unsupported_gguf_arch(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  _one_line_error(tmp_path / "llama.gguf", "llama.gguf.*'llama' is not supported")


def test_flax_shapes_of_no_gemma_family(tmp_path):
  tree = {"transformer/embedder": {"input_embedding": np.zeros((8, 4), np.float32)},
          "transformer/final_norm": {"scale": np.zeros((4,), np.float32)},
          "transformer/layer_0/attn/q_einsum": {"w": np.zeros((2, 4, 2), np.float32)},
          "transformer/layer_0/attn/kv_einsum": {"w": np.zeros((2, 1, 4, 2), np.float32)},
          "transformer/layer_0/mlp/gating_einsum": {"w": np.zeros((3, 4, 6), np.float32)},
          "transformer/layer_0/mlp/linear": {"w": np.zeros((6, 4), np.float32)}}
  _save_raw(tree, tmp_path / "bad")
  _one_line_error(tmp_path / "bad", "bad.*fit no Gemma family")


def test_flax_missing_tensor(tmp_path, hf_dir):
  params, cfg = weights.load(hf_dir[1])
  weights.save(params, cfg, tmp_path / "flax")
  tree = _raw(tmp_path / "flax")
  del tree["transformer/layer_1/pre_ffw_norm"]
  _save_raw(tree, tmp_path / "cut")
  _one_line_error(tmp_path / "cut", "cut.*missing.*pre_ffw_norm")
