"""GGUF export: the merged real Gemma 3 270M read back by our reader and transformers', the
tokenizer and chat template it carries, the tiny families' metadata, and refused input."""

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_it import config, families, lora, model, templates, weights
from jax_it.ckpt import CheckpointError, gguf_write
from jax_it.run import cli, setup

gguf = pytest.importorskip("gguf")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tolerances: max |error| / max |logit| of the merged float32 model
TOLERANCE = {"bf16": 1e-2, "f16": 1e-2, "q8_0": 5e-2}
PROMPTS = ["The capital of France is Paris, and the capital of Italy is",
           "def add(a, b):\n    \"\"\"The sum of a and b.\"\"\"\n    return",
           "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"]


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _nonzero_adapter(cfg, seed=1) -> lora.Lora:
  """A LoRA on every projection with B drawn too, so an export that drops it is caught."""
  lc = lora.LoraConfig(r=4, targets="all-linear")
  ad = lora.init(jax.random.key(seed), cfg, lc)
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(ad.weights)))
  return lora.Lora({t: {"a": w["a"], "b": 0.01 * jax.random.normal(next(keys), w["b"].shape)}
                    for t, w in ad.weights.items()}, lc)


@pytest.fixture(scope="module")
def tokens(gemma_tokenizer):
  ids = [gemma_tokenizer(p)["input_ids"] for p in PROMPTS]
  n = min(map(len, ids))
  return np.array([x[:n] for x in ids], np.int32)


@pytest.fixture(scope="module")
def exported(gemma3_params, gemma3_gguf_path, tokens, tmp_path_factory):
  """The 270M with a nonzero adapter merged, its float32 logits, and its export in each type."""
  params, cfg = gemma3_params
  merged = lora.merge(params, _nonzero_adapter(cfg))
  ref = np.asarray(model.forward(merged, jnp.asarray(tokens), cfg))
  base = np.asarray(model.forward(params, jnp.asarray(tokens), cfg))
  vocab = gguf_write.vocab_from_gguf(gemma3_gguf_path)
  out = tmp_path_factory.mktemp("gguf")
  paths = {t: gguf_write.save_gguf(merged, cfg, out / f"model-{t}.gguf", vocab, gguf_type=t,
                                   chat_template=templates.GEMMA_CHAT_TEMPLATE)
           for t in TOLERANCE}
  return paths, cfg, ref, base


@pytest.mark.parametrize("gguf_type", list(TOLERANCE))
def test_our_reader_gives_the_merged_logits(exported, tokens, gguf_type):
  paths, cfg, ref, base = exported
  params, cfg2 = weights.load(paths[gguf_type])
  assert cfg2 == cfg
  out = model.forward(params, jnp.asarray(tokens), cfg2)
  assert _rel(out, ref) < TOLERANCE[gguf_type]
  assert _rel(base, ref) > 5 * TOLERANCE[gguf_type]  # the adapter shows: the base would fail


def test_transformers_reader_gives_the_merged_logits(exported, tokens):
  """transformers' GGUF loader (its own norm offsets, names and metadata); bf16 only: each load
  takes ~35 s on 2 cores, and the types differ in the bytes, not in what transformers reads."""
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  paths, _, ref, _ = exported
  path = paths["bf16"]
  m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                           dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    out = m(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert _rel(out, ref) < TOLERANCE["bf16"]


def test_metadata_as_llama_cpp_writes_gemma(exported, gemma3_gguf_path):
  paths, _, _, _ = exported
  ours = gguf_write._StringsReader(paths["q8_0"])
  theirs = gguf_write._StringsReader(gemma3_gguf_path)
  for key in ("general.architecture", "gemma3.context_length", "gemma3.embedding_length",
              "gemma3.block_count", "gemma3.feed_forward_length", "gemma3.attention.head_count",
              "gemma3.attention.head_count_kv", "gemma3.attention.key_length",
              "gemma3.attention.value_length", "gemma3.rope.freq_base",
              "gemma3.attention.sliding_window", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
    assert ours.fields[key] == theirs.fields[key], key
  assert ours.fields["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
  assert ours.fields["tokenizer.chat_template"] == templates.GEMMA_CHAT_TEMPLATE
  assert ours.fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
  # the same tensors under the same names and shapes; tied output, float32 norms
  assert {n: t[0] for n, t in ours.tensors.items()} == {n: t[0] for n, t in theirs.tensors.items()}
  assert "output.weight" not in ours.tensors
  kinds = {n: t[1].name for n, t in ours.tensors.items()}
  assert kinds["blk.0.attn_q_norm.weight"] == "F32" and kinds["token_embd.weight"] == "Q8_0"
  assert gguf_write.vocab_from_gguf(paths["q8_0"]) == dataclasses.replace(
      gguf_write.vocab_from_gguf(gemma3_gguf_path),
      chat_template=templates.GEMMA_CHAT_TEMPLATE)


def test_tokenizer_round_trip_and_chat_template(exported, gemma_tokenizer):
  """transformers' tokenizer of the exported file encodes as the base's, chat markers included,
  and its chat template renders the turns the run trained on."""
  from transformers import AutoTokenizer
  path = exported[0]["f16"]
  tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  for text in PROMPTS + ["  two spaces,\ttab\n\nnewlines", "naïve café 東京 🙂"]:
    assert tok(text)["input_ids"] == gemma_tokenizer(text)["input_ids"], text
  msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
  ex = templates.tokenize_segments(templates.render({"messages": msgs}, "gemma"),
                                   gemma_tokenizer, add_eos=False)
  ids = ex["tokens"].tolist() + ex["targets"][-1:].tolist()
  assert tok.apply_chat_template(msgs, tokenize=True)["input_ids"] == ids


def test_vocab_rebuilt_from_transformers_is_the_files(gemma3_gguf_path, gemma_tokenizer):
  """The path for bases without a GGUF: tokens and types as llama.cpp wrote them; scores too,
  but for single characters, whose scores llama.cpp never compares (it merges pairs)."""
  theirs = gguf_write.vocab_from_gguf(gemma3_gguf_path)
  ours = gguf_write.vocab_from_hf(gemma_tokenizer)
  assert ours.tokens == theirs.tokens and ours.types == theirs.types
  assert (ours.bos, ours.eos, ours.unk, ours.pad, ours.add_bos) == (2, 1, 3, 0, True)
  differ = [i for i, (a, b) in enumerate(zip(ours.scores, theirs.scores)) if a != b]
  assert all(len(theirs.tokens[i]) == 1 for i in differ)


# ---------------------------------------------------------------------------------------------
# the other families, at toy width


@pytest.mark.parametrize("family", ["gemma1", "gemma2"])
def test_tiny_families_round_trip(family, tmp_path):
  """Gemma 1 and 2 metadata (soft-caps, window), at toy width with a toy vocabulary; the Flax
  padding rows past the vocabulary are dropped, as llama.cpp wants one row per token."""
  fam = families.FAMILIES[family]
  cfg = fam.config(2, 64, 128, 4, 2 if family == "gemma2" else 4, 16, vocab_size=300,
                   sliding_window=8 if family == "gemma2" else None)
  params = model.init_params(jax.random.key(0), cfg)
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), params)
  vocab = gguf_write.Vocab([f"<t{i}>" for i in range(256)], [0.0] * 256, [1] * 256, bos=2, eos=1,
                           unk=3, pad=0)
  path = gguf_write.save_gguf(params, cfg, tmp_path / "m.gguf", vocab, gguf_type="f16")
  back, cfg2 = weights.load(path)
  assert cfg2.norm_eps == pytest.approx(cfg.norm_eps)  # stored as float32
  cfg = dataclasses.replace(cfg, vocab_size=256)
  assert dataclasses.replace(cfg2, norm_eps=cfg.norm_eps) == cfg
  params["embedder"]["input_embedding"] = params["embedder"]["input_embedding"][:256]
  x = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 20)))
  assert _rel(model.forward(back, x, cfg2), model.forward(params, x, cfg2)) < 1e-2


# ---------------------------------------------------------------------------------------------
# refused input


def test_a_config_llama_cpp_cannot_express_is_refused(tmp_path):
  cfg = families.PRESETS["gemma3-270m"]
  odd = dataclasses.replace(cfg, query_pre_attn_scalar=128.0)
  with pytest.raises(CheckpointError, match="query_pre_attn_scalar 128.0 is not what llama.cpp"):
    gguf_write.save_gguf({}, odd, tmp_path / "x.gguf", None)
  with pytest.raises(CheckpointError, match="GGUF type 'q4_0' is not supported; expected one of"):
    gguf_write.check(cfg, "q4_0")
  assert not list(tmp_path.iterdir())


def test_a_family_the_writer_does_not_know_is_refused(monkeypatch):
  monkeypatch.setattr(gguf_write, "ARCHS", ("gemma", "gemma3"))
  with pytest.raises(CheckpointError, match=r"model family 'gemma2' \(llama.cpp architecture "
                     r"'gemma2'\): the GGUF writer supports gemma, gemma3"):
    gguf_write.check(families.PRESETS["gemma2-tiny"], "f16")


def test_export_of_a_quantized_base_run_is_one_line(tmp_path, monkeypatch, capsys):
  run_dir = tmp_path / "run"
  config.save_config(config.load_config(None, ["model.quant=int8"]), str(run_dir / "config.yaml"))
  (run_dir / "checkpoints" / "3").mkdir(parents=True)
  monkeypatch.setattr(setup, "load_model", lambda section: pytest.fail("model loaded"))
  args = argparse.Namespace(command="export", config=None, run_dir=str(run_dir), overrides=[],
                            out=str(tmp_path / "o"), merged=False, gguf=True, gguf_type="f16")
  assert cli.run(args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "model.quant='int8'" in err and "model.quant=none" in err
