"""Facts of the Gemma models in one place: ModelConfig, the projections of a layer, each family.

Readers, writers, LoRA, quantization and export all read these tables; adding a projection or a
family is a new row here, not an edit in six modules. This module imports nothing of jax_it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

Params = dict[str, Any]  # the model's parameter tree (see model.py for its layout)


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
  # dtype and accumulates in float32 (see ops.einsum); None keeps the inputs' own dtype
  matmul_dtype: str | None = None
  # which implementation of the matmuls and weight indexing runs: "auto" | "plain" | "cpu"
  # (see ops.py); every choice computes the same function
  kernels: str = "auto"
  # which attention kernel runs: "auto" | "xla" | "cudnn" | "splash" (see ops.py)
  attention: str = "auto"

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown Gemma family {self.family!r}; expected one of "
                       f"{sorted(FAMILIES)}")
    if not self.local_layers:
      object.__setattr__(self, "local_layers", (False,) * self.num_layers)
    if len(self.local_layers) != self.num_layers:
      raise ValueError(f"local_layers has {len(self.local_layers)} entries for "
                       f"{self.num_layers} layers")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{self.num_heads} query heads do not divide into "
                       f"{self.num_kv_heads} kv heads")


@dataclasses.dataclass(frozen=True)
class Projection:
  """One linear map of a layer, named as in PEFT/transformers.

  `eq` is the base einsum over one layer's weight (axis letters of model.py): the letters the
  input and the weight share are contracted, the weight's other letters are the output axes.
  `part` picks a half of a stacked weight (kv_einsum [2, K, D, H], gating_einsum [2, D, F]).
  """

  name: str  # PEFT target name, e.g. "q_proj"
  block: str  # "attn" | "mlp": the layer's sub-tree in the params
  param: str  # Flax module name inside the block, e.g. "q_einsum"
  part: int | None  # index into a stacked weight, or None
  eq: str  # x, per-layer weight -> y
  hf: str  # transformers module inside a decoder layer, e.g. "self_attn.q_proj"
  gguf: str  # llama.cpp tensor role inside a block, e.g. "attn_q"

  @property
  def weight_axes(self) -> str:
    return self.eq.split("->")[0].split(",")[1]

  @property
  def in_axes(self) -> str:
    """Letters the projection contracts (A's input axes in LoRA)."""
    x = self.eq.split(",")[0]
    return "".join(a for a in self.weight_axes if a in x)

  @property
  def out_axes(self) -> str:
    """Letters of the weight that reach the output (B's output axes in LoRA)."""
    return "".join(a for a in self.weight_axes if a not in self.in_axes)


# In PEFT's order (the order of "all-linear" and of saved adapters).
PROJECTIONS: dict[str, Projection] = {p.name: p for p in (
    Projection("q_proj", "attn", "q_einsum", None, "BTD,NDH->BTNH", "self_attn.q_proj", "attn_q"),
    Projection("k_proj", "attn", "kv_einsum", 0, "BSD,KDH->BSKH", "self_attn.k_proj", "attn_k"),
    Projection("v_proj", "attn", "kv_einsum", 1, "BSD,KDH->BSKH", "self_attn.v_proj", "attn_v"),
    Projection("o_proj", "attn", "attn_vec_einsum", None, "BTNH,NHD->BTD", "self_attn.o_proj",
               "attn_output"),
    Projection("gate_proj", "mlp", "gating_einsum", 0, "BTD,DF->BTF", "mlp.gate_proj", "ffn_gate"),
    Projection("up_proj", "mlp", "gating_einsum", 1, "BTD,DF->BTF", "mlp.up_proj", "ffn_up"),
    Projection("down_proj", "mlp", "linear", None, "BTF,FD->BTD", "mlp.down_proj", "ffn_down"),
)}
ALL_LINEAR = tuple(PROJECTIONS)


def axis_sizes(cfg) -> dict[str, int]:
  """Sizes of the weight axis letters for a ModelConfig."""
  return {"D": cfg.embed_dim, "F": cfg.hidden_dim, "N": cfg.num_heads, "K": cfg.num_kv_heads,
          "H": cfg.head_dim}


# ---------------------------------------------------------------------------------------------
# Families

# The layer norms of the params (a scale under layers/<norm>/scale), as transformers and
# llama.cpp name them inside a layer; each family has the ones its flags select.
_HF_NORMS = {"pre_attention_norm": "input_layernorm",
             "post_attention_norm": "post_attention_layernorm",
             "pre_ffw_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm",
             "attn/_query_norm": "self_attn.q_norm", "attn/_key_norm": "self_attn.k_norm"}
_GGUF_NORMS = {"pre_attention_norm": "attn_norm", "post_attention_norm": "post_attention_norm",
               "pre_ffw_norm": "ffn_norm", "post_ffw_norm": "post_ffw_norm",
               "attn/_query_norm": "attn_q_norm", "attn/_key_norm": "attn_k_norm"}


@dataclasses.dataclass(frozen=True)
class Family:
  """What one Gemma generation is, and how transformers, llama.cpp and Flax checkpoints say so.

  Facts a checkpoint's metadata does not carry are settled here, per official model where they
  differ inside a family (told apart by width or layer count, as the official code does).
  """

  name: str  # ModelConfig.family
  # transformers model_type: the text model's first (written on export); a later one is a
  # multimodal wrapper whose text_config holds the text model
  hf_types: tuple[str, ...]
  hf_class: str  # the causal LM class, written to an exported config.json
  gguf_arch: str  # general.architecture of llama.cpp files
  vocab_size: int  # rows of the official embedding: the config builders' default
  local_period: int | None  # every period-th layer is global, the others local; None: all global
  post_norms: bool  # norms after attention and MLP too
  qk_norm: bool  # RMSNorm on queries and keys
  attn_soft_cap: float | None = None
  final_soft_cap: float | None = None
  rope_base: float = 10_000.0  # of the global layers
  rope_base_local: float | None = None  # of the local layers; None: the global base
  sliding_window: int | None = None  # the config builders' default
  narrow_window: tuple[int, int] | None = None  # (widest, window): narrow models slide less far
  wide_rope_scale: tuple[int, float] | None = None  # (narrowest, scale) of global-layer RoPE
  # (layers, width) of the model whose queries scale by (D / N) ** -0.5, not head_dim ** -0.5
  wide_query: tuple[int, int] | None = None
  # the official Flax checkpoints store gate/up as [2, F, D] (not [2, D, F]) above this width
  transposed_gating_above: int | None = None
  # transformers' class defaults, for config.json files that leave keys out; its keys are the
  # config keys the family's transformers class has
  hf_defaults: dict = dataclasses.field(default_factory=dict)
  hf_norm_renames: dict = dataclasses.field(default_factory=dict)  # exceptions to _HF_NORMS
  gguf_norm_offset: float = 1.0  # llama.cpp stores RMSNorm scales as offset + w

  @property
  def norms(self) -> tuple[str, ...]:
    post = ("post_attention_norm", "post_ffw_norm") if self.post_norms else ()
    qk = ("attn/_query_norm", "attn/_key_norm") if self.qk_norm else ()
    return ("pre_attention_norm", "pre_ffw_norm") + post + qk

  @property
  def hf_norms(self) -> dict[str, str]:
    """Our norm -> its transformers module inside a decoder layer."""
    return {n: self.hf_norm_renames.get(n, _HF_NORMS[n]) for n in self.norms}

  @property
  def gguf_norms(self) -> dict[str, str]:
    """Our norm -> its llama.cpp tensor role inside a block."""
    return {n: _GGUF_NORMS[n] for n in self.norms}

  def local_layers(self, num_layers: int) -> tuple[bool, ...]:
    if self.local_period is None:
      return (False,) * num_layers
    return layer_pattern(num_layers, self.local_period)

  def window(self, embed_dim: int) -> int | None:
    """The sliding window of the official model of this width."""
    if self.narrow_window is not None and embed_dim <= self.narrow_window[0]:
      return self.narrow_window[1]
    return self.sliding_window

  def rope_scale(self, embed_dim: int) -> float:
    """The global-layer RoPE scale of the official model of this width."""
    if self.wide_rope_scale is not None and embed_dim >= self.wide_rope_scale[0]:
      return self.wide_rope_scale[1]
    return 1.0

  def query_scalar(self, embed_dim: int, num_heads: int, head_dim: int, *,
                   num_layers: int | None = None) -> int:
    """query_pre_attn_scalar of the official model: head_dim, or D / N for the wide_query model,
    recognised by its layer count when given (as llama.cpp does), else by its width."""
    if self.wide_query is None:
      return head_dim
    layers, width = self.wide_query
    wide = num_layers == layers if num_layers is not None else embed_dim == width
    return embed_dim // num_heads if wide else head_dim

  def transposed_gating(self, embed_dim: int) -> bool:
    """Whether the official Flax checkpoint of this width stores gating as [2, F, D]."""
    return self.transposed_gating_above is not None and embed_dim > self.transposed_gating_above

  def config(self, num_layers, embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim,
             **fields):
    """A ModelConfig of this family with its defaults; `fields` set any ModelConfig field."""
    base = dict(
        family=self.name, num_layers=num_layers, vocab_size=self.vocab_size, embed_dim=embed_dim,
        hidden_dim=hidden_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        query_pre_attn_scalar=head_dim, attn_logits_soft_cap=self.attn_soft_cap,
        final_logit_soft_cap=self.final_soft_cap,
        sliding_window=self.sliding_window if self.local_period else None,
        local_layers=self.local_layers(num_layers),
        rope_base_local=self.rope_base if self.rope_base_local is None else self.rope_base_local,
        rope_base_global=self.rope_base, use_post_norms=self.post_norms,
        use_qk_norm=self.qk_norm, transposed_gating=self.transposed_gating(embed_dim))
    return ModelConfig(**{**base, **fields})


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gemma1", hf_types=("gemma",), hf_class="GemmaForCausalLM", gguf_arch="gemma",
           vocab_size=256_000, local_period=None, post_norms=False, qk_norm=False,
           hf_defaults=dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                            rope_theta=10_000.0, sliding_window=None),
           # Gemma 1 calls its pre-MLP norm post_attention_layernorm
           hf_norm_renames={"pre_ffw_norm": "post_attention_layernorm"}),
    Family("gemma2", hf_types=("gemma2",), hf_class="Gemma2ForCausalLM", gguf_arch="gemma2",
           vocab_size=256_128, local_period=2, post_norms=True, qk_norm=False,
           attn_soft_cap=50.0, final_soft_cap=30.0, sliding_window=4096,
           wide_query=(46, 4608), transposed_gating_above=2304,
           hf_defaults=dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            query_pre_attn_scalar=256, rope_theta=10_000.0, sliding_window=4096,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    Family("gemma3", hf_types=("gemma3_text", "gemma3"), hf_class="Gemma3ForCausalLM",
           gguf_arch="gemma3", vocab_size=262_144, local_period=6, post_norms=True, qk_norm=True,
           rope_base=1_000_000.0, rope_base_local=10_000.0, sliding_window=1024,
           narrow_window=(1152, 512), wide_rope_scale=(2560, 8.0), wide_query=(62, 5376),
           transposed_gating_above=0,
           hf_defaults=dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            query_pre_attn_scalar=256, rope_theta=1_000_000.0,
                            rope_local_base_freq=10_000.0, sliding_window=4096,
                            sliding_window_pattern=6)),
)}


def layer_pattern(num_layers: int, period: int) -> tuple[bool, ...]:
  """Local/global pattern: every `period`-th layer (1-based) is global, the others local."""
  return tuple((i + 1) % period != 0 for i in range(num_layers))


def gemma2_config(num_layers, embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim,
                  query_pre_attn_scalar, vocab_size=None, sliding_window=None):
  """A Gemma 2 ModelConfig; vocab_size and sliding_window default to the family's."""
  fam = FAMILIES["gemma2"]
  return fam.config(num_layers, embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim,
                    query_pre_attn_scalar=query_pre_attn_scalar,
                    vocab_size=fam.vocab_size if vocab_size is None else vocab_size,
                    sliding_window=fam.sliding_window if sliding_window is None else sliding_window)


def gemma3_config(num_layers, embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim=256,
                  vocab_size=None, sliding_window=None, rope_scale_global=1.0):
  """A Gemma 3 ModelConfig; vocab_size and sliding_window default to the family's."""
  fam = FAMILIES["gemma3"]
  return fam.config(num_layers, embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim,
                    vocab_size=fam.vocab_size if vocab_size is None else vocab_size,
                    sliding_window=fam.sliding_window if sliding_window is None else sliding_window,
                    rope_scale_global=rope_scale_global)


PRESETS: dict[str, ModelConfig] = {
    "gemma2-2b": gemma2_config(26, 2304, 9216, 8, 4, 256, 256),
    "gemma2-9b": gemma2_config(42, 3584, 14336, 16, 8, 256, 256),
    "gemma2-27b": gemma2_config(46, 4608, 36864, 32, 16, 128, 144),
    "gemma3-270m": gemma3_config(18, 640, 2048, 4, 1, sliding_window=512),
    "gemma3-1b": gemma3_config(26, 1152, 6912, 4, 1, sliding_window=512),
    # for smoke runs and tests: Gemma 2 features at toy width, sized for the Gemma 3 tokenizer
    "gemma2-tiny": gemma2_config(2, 64, 128, 4, 2, 16, 16, vocab_size=262_144,
                                 sliding_window=32),
}
