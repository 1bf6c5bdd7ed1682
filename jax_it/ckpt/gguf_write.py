"""GGUF export: merged params -> one llama.cpp file (metadata, tokenizer, chat template, weights).

Written as llama.cpp's convert script writes Gemma: its tensor names, RMSNorm scales stored as
gguf_norm_offset + w (the reader subtracts it again), no output.weight (the output is tied to
token_embd), 1-D tensors in float32 whatever the type of the matrices.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
from flax import traverse_util

from jax_it.ckpt import CheckpointError
from jax_it.ckpt.gguf import GGUFFile
from jax_it.ckpt.stack import to_matrix
from jax_it.families import FAMILIES, PROJECTIONS, Family
from jax_it.model import ModelConfig, Params

# --gguf-type -> (GGML type of the matrices, general.file_type)
TYPES = {"bf16": ("BF16", "MOSTLY_BF16"), "f16": ("F16", "MOSTLY_F16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# the llama.cpp architectures this writer knows the metadata of
ARCHS = ("gemma", "gemma2", "gemma3")
# llama.cpp's token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The tokenizer.ggml.* fields of a sentencepiece ("llama") vocabulary."""

  tokens: list[str]
  scores: list[float]
  types: list[int]
  bos: int
  eos: int
  unk: int | None
  pad: int | None
  add_bos: bool = True
  add_eos: bool = False
  add_space_prefix: bool = False
  chat_template: str | None = None  # the source's own, if it has one


class _StringsReader(GGUFFile):
  """GGUFFile that keeps string arrays (the vocabulary): about 0.3 s for 262k tokens."""

  def _value(self, kind):
    if kind == 9:
      start = self.pos
      elem, count = self._read("<I"), self._read("<Q")
      if elem == 8:
        return [self._str() for _ in range(count)]
      self.pos = start
    return super()._value(kind)


def vocab_from_gguf(path: str | os.PathLike) -> Vocab:
  """The vocabulary of a llama.cpp file, copied as it is (the exact fields llama.cpp wrote)."""
  try:
    f = _StringsReader(Path(path)).fields
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
  if f.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.tokens" not in f:
    raise CheckpointError(f"{path}: tokenizer.ggml.model={f.get('tokenizer.ggml.model')!r}; "
                          "the GGUF export copies sentencepiece ('llama') vocabularies only")
  opt = lambda k: None if f.get(k) is None else int(f[k])
  n = len(f["tokenizer.ggml.tokens"])
  scores = f.get("tokenizer.ggml.scores")
  types = f.get("tokenizer.ggml.token_type")
  return Vocab(
      tokens=f["tokenizer.ggml.tokens"],
      scores=[0.0] * n if scores is None else [float(s) for s in scores],
      types=[_NORMAL] * n if types is None else [int(t) for t in types],
      bos=int(f["tokenizer.ggml.bos_token_id"]), eos=int(f["tokenizer.ggml.eos_token_id"]),
      unk=opt("tokenizer.ggml.unknown_token_id"), pad=opt("tokenizer.ggml.padding_token_id"),
      add_bos=bool(f.get("tokenizer.ggml.add_bos_token", True)),
      add_eos=bool(f.get("tokenizer.ggml.add_eos_token", False)),
      add_space_prefix=bool(f.get("tokenizer.ggml.add_space_prefix", False)),
      chat_template=f.get("tokenizer.chat_template"))


def vocab_from_hf(tok) -> Vocab:
  """The vocabulary of a transformers Gemma tokenizer, in llama.cpp's sentencepiece form.

  transformers keeps no sentencepiece scores; llama.cpp merges pieces by score, and Gemma's
  scores fall with the piece's position, so ordinary pieces score minus their rank. Added
  tokens score -1000 and bytes 0, as llama.cpp's converter gives them.
  """
  tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
  # sentencepiece spells runs of spaces with real spaces, transformers with U+2581
  # (user-defined pieces in Gemma's sentencepiece model)
  spaces = {i for i, t in enumerate(tokens) if len(t) > 1 and set(t) == {"\u2581"}}
  tokens = [" " * len(t) if i in spaces else t for i, t in enumerate(tokens)]
  added = {i: t.special for i, t in tok.added_tokens_decoder.items()}
  types, scores, rank = [], [], 0
  for i, t in enumerate(tokens):
    if i in added:
      kind = _CONTROL if added[i] else _USER_DEFINED
    elif i in spaces:
      kind = _USER_DEFINED
    elif re.fullmatch(r"<0x[0-9A-F]{2}>", t):
      kind = _BYTE
    elif i == tok.unk_token_id:
      kind = _UNKNOWN
    else:
      kind = _NORMAL
    types.append(kind)
    scores.append(float(-rank) if kind == _NORMAL else 0.0 if kind == _BYTE else -1000.0)
    rank += kind == _NORMAL
  return Vocab(tokens, scores, types, bos=tok.bos_token_id, eos=tok.eos_token_id,
               unk=tok.unk_token_id, pad=tok.pad_token_id,
               add_bos=tok("a")["input_ids"][:1] == [tok.bos_token_id],
               chat_template=getattr(tok, "chat_template", None))


# ---------------------------------------------------------------------------------------------
# Checks: llama.cpp hard-codes what the metadata cannot say


def check(cfg: ModelConfig, gguf_type: str) -> Family:
  """The family of cfg, once the file can say everything cfg is (a one-line error otherwise)."""
  if gguf_type not in TYPES:
    raise CheckpointError(f"GGUF type {gguf_type!r} is not supported; expected one of "
                          f"{', '.join(TYPES)}")
  fam = FAMILIES[cfg.family]
  if fam.gguf_arch not in ARCHS:
    raise CheckpointError(f"model family {cfg.family!r} (llama.cpp architecture "
                          f"{fam.gguf_arch!r}): the GGUF writer supports {', '.join(ARCHS)}")
  L, D, N, H = cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.head_dim
  fixed = {  # what llama.cpp assumes for this architecture -> what this model has
      "local/global layer pattern": (fam.local_layers(L), cfg.local_layers),
      "query_pre_attn_scalar": (fam.query_scalar(D, N, H, num_layers=L),
                                cfg.query_pre_attn_scalar),
      "local-layer rope base": (cfg.rope_base_global if fam.rope_base_local is None
                                else fam.rope_base_local, cfg.rope_base_local),
  }
  if fam.gguf_arch != "gemma2":  # only gemma2 has soft-cap keys
    fixed["soft-caps"] = ((None, None), (cfg.attn_logits_soft_cap, cfg.final_logit_soft_cap))
  if fam.gguf_arch != "gemma3":  # only gemma3 scales the global layers' rope
    fixed["global rope scale"] = (1.0, cfg.rope_scale_global)
  for what, (want, have) in fixed.items():
    if tuple(np.atleast_1d(want)) != tuple(np.atleast_1d(have)):
      raise CheckpointError(f"{cfg.family}: {what} {have} is not what llama.cpp assumes for "
                            f"{fam.gguf_arch} ({want}); a GGUF file cannot say it")
  return fam


# ---------------------------------------------------------------------------------------------
# Writing


def _metadata(w, cfg: ModelConfig, fam: Family, context_length: int | None):
  import gguf  # pylint: disable=g-import-not-at-top
  if context_length is None:  # llama.cpp's converter copies max_position_embeddings
    context_length = {"gemma": 8192, "gemma2": 8192}.get(
        fam.gguf_arch, 131_072 if cfg.rope_scale_global != 1.0 else 32_768)
  w.add_context_length(int(context_length))
  w.add_embedding_length(cfg.embed_dim)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.hidden_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(float(cfg.norm_eps))
  w.add_rope_freq_base(float(cfg.rope_base_global))
  if cfg.sliding_window is not None and any(cfg.local_layers):
    w.add_sliding_window(int(cfg.sliding_window))
  if cfg.attn_logits_soft_cap is not None:
    w.add_attn_logit_softcapping(float(cfg.attn_logits_soft_cap))
  if cfg.final_logit_soft_cap is not None:
    w.add_final_logit_softcapping(float(cfg.final_logit_soft_cap))
  if cfg.rope_scale_global != 1.0:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(cfg.rope_scale_global))


def _vocab(w, v: Vocab, chat_template: str | None):
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(v.tokens)
  w.add_token_scores([float(s) for s in v.scores])
  w.add_token_types([int(t) for t in v.types])
  w.add_bos_token_id(v.bos)
  w.add_eos_token_id(v.eos)
  if v.unk is not None:
    w.add_unk_token_id(v.unk)
  if v.pad is not None:
    w.add_pad_token_id(v.pad)
  w.add_add_bos_token(v.add_bos)
  w.add_add_eos_token(v.add_eos)
  w.add_add_space_prefix(v.add_space_prefix)
  if chat_template or v.chat_template:
    w.add_chat_template(chat_template or v.chat_template)


def _tensors(params: Params, cfg: ModelConfig, fam: Family, vocab_rows: int):
  """(llama.cpp name, [out, in] shape or [n], producer of the float32 values), in file order."""
  f32 = lambda x: np.asarray(x, np.float32)
  off = fam.gguf_norm_offset
  emb = params["embedder"]["input_embedding"]
  out = [("token_embd.weight", (vocab_rows, cfg.embed_dim), lambda: f32(emb[:vocab_rows])),
         ("output_norm.weight", (cfg.embed_dim,),
          lambda: f32(params["final_norm"]["scale"]) + off)]
  lp = traverse_util.flatten_dict(params["layers"], sep="/")
  for i in range(cfg.num_layers):
    for p in PROJECTIONS.values():
      w = lp[f"{p.block}/{p.param}/w"]
      shape = to_matrix(np.empty(w.shape[1 + (p.part is not None):], np.uint8), p).shape
      part = (i,) if p.part is None else (i, p.part)
      out.append((f"blk.{i}.{p.gguf}.weight", shape,
                  lambda w=w, part=part, p=p: to_matrix(f32(w[part]), p)))
    for norm, role in fam.gguf_norms.items():
      s = lp[f"{norm}/scale"]
      out.append((f"blk.{i}.{role}.weight", s.shape[1:], lambda s=s, i=i: f32(s[i]) + off))
  return out


def save_gguf(params: Params, cfg: ModelConfig, path: str | os.PathLike, vocab: Vocab, *,
              gguf_type: str = "f16", chat_template: str | None = None,
              context_length: int | None = None, name: str | None = None) -> Path:
  """Write the model as one llama.cpp file; streamed one tensor at a time, renamed at the end
  so an interrupted export leaves no half-written .gguf."""
  import gguf  # pylint: disable=g-import-not-at-top
  from gguf.quants import quant_shape_to_byte_shape, quantize  # pylint: disable=g-import-not-at-top
  fam = check(cfg, gguf_type)
  if "input_embedding_scale" in params["embedder"]:
    raise CheckpointError(f"{path}: GGUF export needs float params; load the model with "
                          "model.quant=none")
  rows = params["embedder"]["input_embedding"].shape[0]
  if rows < len(vocab.tokens):
    raise CheckpointError(f"{path}: the embedding has {rows} rows for a vocabulary of "
                          f"{len(vocab.tokens)} tokens")
  qtype = gguf.GGMLQuantizationType[TYPES[gguf_type][0]]
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  w = gguf.GGUFWriter(str(tmp), fam.gguf_arch)
  try:
    w.add_type("model")
    if name:
      w.add_name(name)
    _metadata(w, cfg, fam, context_length)
    w.add_file_type(int(gguf.LlamaFileType[TYPES[gguf_type][1]]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(w, vocab, chat_template)
    # llama.cpp wants one embedding row per token: Flax's padding rows are dropped
    tensors = _tensors(params, cfg, fam, len(vocab.tokens))
    kinds = [qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32
             for _, shape, _ in tensors]
    for (tname, shape, _), kind in zip(tensors, kinds):
      nbytes = int(np.prod(quant_shape_to_byte_shape(shape, kind)))
      w.add_tensor_info(tname, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for (_, _, make), kind in zip(tensors, kinds):
      w.write_tensor_data(quantize(make(), kind))
    w.close()
    os.replace(tmp, path)
  except BaseException:
    w.close()
    tmp.unlink(missing_ok=True)
    raise
  return path
