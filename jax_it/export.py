"""Export params (e.g. merged with an adapter) as a Hugging Face model directory."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from jax_it.model import ModelConfig, Params

_HF_TYPES = {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}


def hf_config(cfg: ModelConfig):
  """The transformers config object of the installed version for this model."""
  import transformers

  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
                intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1,
                bos_token_id=2, tie_word_embeddings=True)
  layer_types = ["sliding_attention" if local else "full_attention" for local in cfg.local_layers]
  if cfg.family == "gemma1":
    return transformers.GemmaConfig(rope_theta=cfg.rope_base_global, **common)
  if cfg.family == "gemma2":
    return transformers.Gemma2Config(
        query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
        attn_logit_softcapping=cfg.attn_logits_soft_cap,
        final_logit_softcapping=cfg.final_logit_soft_cap, layer_types=layer_types,
        rope_theta=cfg.rope_base_global, **common)
  global_rope = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
  if cfg.rope_scale_global != 1.0:
    global_rope = {"rope_type": "linear", "factor": cfg.rope_scale_global,
                   "rope_theta": cfg.rope_base_global}
  return transformers.Gemma3TextConfig(
      query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
      layer_types=layer_types, rope_parameters={
          "full_attention": global_rope,
          "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local}},
      **common)


def hf_tensors(params: Params, cfg: ModelConfig):
  """(name, float32 array) pairs in the transformers layout, one layer at a time."""
  N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  f32 = lambda x: np.asarray(x, np.float32)
  yield "model.embed_tokens.weight", f32(params["embedder"]["input_embedding"])
  yield "model.norm.weight", f32(params["final_norm"]["scale"])
  lp = params["layers"]
  norms = {"pre_attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
           "pre_ffw_norm": "pre_feedforward_layernorm",
           "post_ffw_norm": "post_feedforward_layernorm"}
  if cfg.family == "gemma1":  # Gemma 1 calls its pre-MLP norm post_attention_layernorm
    norms = {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    attn, mlp = lp["attn"], lp["mlp"]
    q = f32(attn["q_einsum"]["w"][i])  # [N, D, H] -> [N*H, D]
    yield pre + "self_attn.q_proj.weight", q.transpose(0, 2, 1).reshape(N * H, D)
    kv = f32(attn["kv_einsum"]["w"][i])  # [2, K, D, H]
    yield pre + "self_attn.k_proj.weight", kv[0].transpose(0, 2, 1).reshape(K * H, D)
    yield pre + "self_attn.v_proj.weight", kv[1].transpose(0, 2, 1).reshape(K * H, D)
    o = f32(attn["attn_vec_einsum"]["w"][i])  # [N, H, D] -> [D, N*H]
    yield pre + "self_attn.o_proj.weight", o.reshape(N * H, D).T
    if cfg.use_qk_norm:
      yield pre + "self_attn.q_norm.weight", f32(attn["_query_norm"]["scale"][i])
      yield pre + "self_attn.k_norm.weight", f32(attn["_key_norm"]["scale"][i])
    gating = f32(mlp["gating_einsum"]["w"][i])  # [2, D, F]
    yield pre + "mlp.gate_proj.weight", gating[0].T
    yield pre + "mlp.up_proj.weight", gating[1].T
    yield pre + "mlp.down_proj.weight", f32(mlp["linear"]["w"][i]).T
    for ours, theirs in norms.items():
      yield pre + theirs + ".weight", f32(lp[ours]["scale"][i])


def save_hf(params: Params, cfg: ModelConfig, out_dir: str, tokenizer=None):
  """config.json + model.safetensors (+ tokenizer), loadable by AutoModelForCausalLM.

  Written into a temporary folder beside out_dir and renamed at the end, so an interrupted
  export never leaves a half-written model directory.
  """
  from safetensors.numpy import save_file

  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not empty; remove it or choose another "
                          "output folder")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    conf = hf_config(cfg)
    conf.architectures = [{"gemma1": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                           "gemma3": "Gemma3ForCausalLM"}[cfg.family]]
    conf.save_pretrained(tmp)
    tensors = {name: np.ascontiguousarray(x) for name, x in hf_tensors(params, cfg)}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
      os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
