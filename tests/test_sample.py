"""Tests for KV-cache generation: cache vs full forward, batching, EOS, sampling, transformers."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_it import families, model, sample
from jax_it import lora as lora_lib

V = 97
BOS, EOS, PAD = 2, 1, 0
N_NEW = 10  # one length everywhere, so tests share compiled programs
# sliding window 6 is shorter than every prompt + generation below, so local layers really slide
GEMMA2 = families.gemma2_config(4, 32, 64, 4, 2, 8, 8, vocab_size=V, sliding_window=6)
GEMMA3 = families.gemma3_config(6, 32, 64, 4, 1, 8, vocab_size=V, sliding_window=6,
                             rope_scale_global=8.0)
CONFIGS = {"gemma2": GEMMA2, "gemma3": GEMMA3}


def random_params(cfg, seed=0):
  """Params with random norm scales and weights large enough that the layers shape the output.

  init_params' 0.02 weights and zero norms give a model that just repeats its last token.
  """
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in leaves:
    name = jax.tree_util.keystr(path)
    std = 0.1 if "embed" in name else 0.5 if "norm" in name else 0.3
    out.append(jnp.asarray(std * rng.standard_normal(x.shape), x.dtype))
  return jax.tree.unflatten(treedef, out)


def random_prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [[BOS] + rng.integers(3, V, n - 1).tolist() for n in lengths]


@pytest.fixture(scope="module")
def params():
  return {name: random_params(cfg) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("name", [*CONFIGS, "gemma3 bfloat16"])
def test_cache_matches_full_forward(params, name):
  cfg, p = CONFIGS[name.split()[0]], params[name.split()[0]]
  if name.endswith("bfloat16"):
    # bfloat16 weights and matmuls: keys and values are float32 (each matmul rounds its own
    # inputs), and so is the cache; a bfloat16 cache put decode 2-3% of the logit range away
    # from the full forward here
    cfg = dataclasses.replace(cfg, matmul_dtype="bfloat16")
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
  prompts = random_prompts([3, 12])
  spec = sample.SampleSpec(max_new_tokens=N_NEW, stop_ids=())
  out, logits = sample.generate_arrays(p, cfg, prompts, spec=spec, keep_logits=True)
  # attention is causal, so one forward over each final sequence gives every step's full
  # recompute (position t sees only tokens 0..t), and right-padding the shorter row changes
  # nothing before its pads
  seqs = [q + row.tolist() for q, row in zip(prompts, out)]
  width = max(map(len, seqs))
  full = jnp.asarray([q + [PAD] * (width - len(q)) for q in seqs], jnp.int32)
  ref_all = np.asarray(model.forward(p, full, cfg))
  for b, prompt in enumerate(prompts):
    ref = ref_all[b, len(prompt) - 1:len(prompt) - 1 + N_NEW]
    rel = np.abs(logits[b] - ref).max(axis=-1) / np.abs(ref).max(axis=-1)
    assert rel.max() < 1e-5, rel
    np.testing.assert_array_equal(out[b], ref.argmax(-1))


def test_batched_equals_alone(params):
  # test_cache_matches_full_forward already runs rows of different lengths for both families
  cfg, p = GEMMA2, params["gemma2"]
  prompts = random_prompts([3, 17, 70], seed=1)  # 70 lands in a larger prompt bucket alone
  batched = sample.generate(p, cfg, prompts, max_new_tokens=N_NEW, eos_id=None)
  alone = [sample.generate(p, cfg, [q], max_new_tokens=N_NEW, eos_id=None)[0] for q in prompts]
  assert batched == alone
  assert all(len(row) == N_NEW for row in batched)


def test_eos_stops_row(params):
  p = params["gemma2"]
  prompts = random_prompts([4, 9], seed=2)
  free = sample.generate(p, GEMMA2, prompts, max_new_tokens=N_NEW, eos_id=None)
  eos = free[0][5]
  stopped = sample.generate(p, GEMMA2, prompts, max_new_tokens=N_NEW, eos_id=eos)
  for got, row in zip(stopped, free):
    want = row[:row.index(eos) + 1] if eos in row else row
    assert got == want
  assert stopped[0][-1] == eos and len(stopped[0]) <= 6
  # several stop ids (EOS and a turn terminator): each row stops at the first of either
  other = free[1][3]
  both = sample.generate(p, GEMMA2, prompts, max_new_tokens=N_NEW, eos_id=(eos, other))
  for got, row in zip(both, free):
    hits = [i for i, t in enumerate(row) if t in (eos, other)]
    assert got == (row[:hits[0] + 1] if hits else row)
  assert both[1][-1] in (eos, other) and len(both[1]) <= 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_yields_the_tokens_generate_gives(params, temperature):
  p = params["gemma3"]
  prompt = random_prompts([7], seed=8)
  kw = dict(max_new_tokens=N_NEW, temperature=temperature, top_k=20, seed=3)
  free = sample.generate(p, GEMMA3, prompt, eos_id=None, **kw)[0]
  spec = sample.SampleSpec(stop_ids=(), **kw)
  assert list(sample.stream(p, GEMMA3, prompt[0], spec=spec)) == free
  stop = free[4]
  spec = sample.SampleSpec(stop_ids=(stop,), **kw)
  assert list(sample.stream(p, GEMMA3, prompt[0], spec=spec)) == free[:free.index(stop) + 1]


def test_loop_ends_when_every_row_has_stopped(params):
  p = params["gemma2"]
  prompt = random_prompts([5], seed=3)
  free = sample.generate(p, GEMMA2, prompt, max_new_tokens=N_NEW, eos_id=None)[0]
  eos = free[2]
  j = free.index(eos)
  spec = sample.SampleSpec(max_new_tokens=N_NEW, stop_ids=(eos,), pad_id=PAD)
  out, logits = sample.generate_arrays(p, GEMMA2, prompt, spec=spec, keep_logits=True)
  assert out[0, :j + 1].tolist() == free[:j + 1]
  assert (out[0, j + 1:] == PAD).all()
  # no step ran after the only row stopped, so its logit slots were never written
  assert (logits[0, j + 1:] == 0).all() and (logits[0, :j + 1] != 0).any(axis=-1).all()


def test_top_k_one_equals_greedy(params):
  p, prompts = params["gemma2"], random_prompts([4, 11], seed=4)
  greedy = sample.generate(p, GEMMA2, prompts, max_new_tokens=N_NEW, eos_id=None)
  top1 = sample.generate(p, GEMMA2, prompts, max_new_tokens=N_NEW, eos_id=None, temperature=1.0,
                         top_k=1, seed=7)
  assert top1 == greedy


def test_top_p_tiny_equals_greedy(params):
  p, prompts = params["gemma3"], random_prompts([4, 11], seed=5)
  greedy = sample.generate(p, GEMMA3, prompts, max_new_tokens=N_NEW, eos_id=None)
  nucleus = sample.generate(p, GEMMA3, prompts, max_new_tokens=N_NEW, eos_id=None,
                            temperature=1.0, top_p=1e-6, seed=7)
  assert nucleus == greedy


def test_sampling_is_deterministic_per_seed(params):
  p, prompts = params["gemma2"], random_prompts([4, 11], seed=6)
  kw = dict(max_new_tokens=N_NEW, eos_id=None, temperature=1.0, top_k=50, top_p=0.95)
  a = sample.generate(p, GEMMA2, prompts, seed=0, **kw)
  b = sample.generate(p, GEMMA2, prompts, seed=0, **kw)
  c = sample.generate(p, GEMMA2, prompts, seed=1, **kw)
  assert a == b
  assert a != c
  assert all(0 <= t < V for row in a for t in row)


# ---------------------------------------------------------------------------------------------
# The queue: more prompts than slots, rows stopping at different steps


def _cut(rows, stops):
  return [sample._cut_at_stop(row, stops) for row in rows]


def test_queue_gives_each_row_its_tokens_alone(params):
  p = params["gemma3"]
  # 12 prompts through 8 slots, 3 steps a chunk: slots refill, the batch shrinks to 2 at the
  # end; lengths 1 (nothing to prefill) to 70 (a second prompt bucket) share batches
  prompts = random_prompts([3, 17, 70, 1, 9, 30, 2, 65, 5, 12, 4, 40], seed=10)
  # the one-batch loop, whose rows equal each prompt alone (test_batched_equals_alone)
  spec = sample.SampleSpec(max_new_tokens=N_NEW, stop_ids=())
  free = _cut(sample.generate_arrays(p, GEMMA3, prompts, spec=spec)[0], ())
  # stop ids from the free runs, so rows stop at several steps and some never
  stops = (free[1][5], free[3][2], free[6][7])
  spec = dataclasses.replace(spec, stop_ids=stops)
  want = _cut(sample.generate_arrays(p, GEMMA3, prompts, spec=spec)[0], stops)
  assert len({len(w) for w in want}) >= 4 and N_NEW in map(len, want)
  got = sample.generate(p, GEMMA3, prompts, max_new_tokens=N_NEW, eos_id=stops, batch=8,
                        chunk=3)
  assert got == want


def test_queue_samples_prompt_j_with_seed_plus_j(params):
  p, prompts = params["gemma3"], random_prompts([4, 11, 2, 7, 20], seed=11)
  kw = dict(max_new_tokens=N_NEW, temperature=1.0, top_k=20)
  got = sample.generate(p, GEMMA3, prompts, eos_id=None, seed=5, batch=2, chunk=4, **kw)
  assert got == sample.generate(p, GEMMA3, prompts, eos_id=None, seed=5, batch=2, chunk=4, **kw)
  for j, prompt in enumerate(prompts):
    spec = sample.SampleSpec(stop_ids=(), seed=5 + j, **kw)
    assert got[j] == list(sample.stream(p, GEMMA3, prompt, spec=spec))
  # the rows after the first, with the seed one higher: the same draws
  assert sample.generate(p, GEMMA3, prompts[1:], eos_id=None, seed=6, batch=2, chunk=4,
                         **kw) == got[1:]


def _frequencies(spec, probs, n=20_000):
  logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs), (n, len(probs))))
  ids = np.asarray(sample.sample_logits(logits, jax.random.key(0), spec.shape, spec.knobs))
  return np.bincount(ids, minlength=len(probs)) / n


def test_sample_logits_hand_worked():
  probs = [0.5, 0.3, 0.15, 0.05]
  # top-p 0.7: the mass before token 1 is 0.5 < 0.7 (kept), before token 2 is 0.8 (dropped)
  f = _frequencies(sample.SampleSpec(temperature=1.0, top_p=0.7), probs)
  np.testing.assert_allclose(f, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.02)
  f = _frequencies(sample.SampleSpec(temperature=1.0, top_p=0.85), probs)
  np.testing.assert_allclose(f, np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.02)
  f = _frequencies(sample.SampleSpec(temperature=1.0, top_k=2), probs)
  np.testing.assert_allclose(f, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.02)
  # temperature 0.5 squares the probabilities before renormalising
  sq = np.square(probs)
  f = _frequencies(sample.SampleSpec(temperature=0.5), probs)
  np.testing.assert_allclose(f, sq / sq.sum(), atol=0.02)
  f = _frequencies(sample.SampleSpec(temperature=0.0), probs, n=10)
  np.testing.assert_array_equal(f, [1, 0, 0, 0])


def test_lora_generation_equals_merged_model(params):
  p = params["gemma2"]
  lcfg = lora_lib.LoraConfig(r=4, alpha=8, targets="all-linear")
  shapes = jax.eval_shape(lambda: lora_lib.init(jax.random.key(0), GEMMA2, lcfg).weights)
  rng = np.random.default_rng(0)
  weights = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                         shapes)
  adapter = lora_lib.Lora(weights, lcfg)
  prompts = random_prompts([4, 11], seed=8)
  with_lora = sample.generate(p, GEMMA2, prompts, lora=adapter, max_new_tokens=N_NEW,
                              eos_id=None)
  merged = sample.generate(lora_lib.merge(p, adapter), GEMMA2, prompts, max_new_tokens=N_NEW,
                           eos_id=None)
  base = sample.generate(p, GEMMA2, prompts, max_new_tokens=N_NEW, eos_id=None)
  assert with_lora == merged
  assert with_lora != base


def _word_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, **{f"w{i}": i for i in range(3, V)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                 pad_token="<pad>")


def test_generate_text(params):
  p, tokenizer = params["gemma2"], _word_tokenizer()
  texts = ["w5 w7 w9", "w3 w4 w5 w6 w7 w8"]
  ids = [[BOS] + [int(w[1:]) for w in t.split()] for t in texts]
  free = sample.generate(p, GEMMA2, ids, max_new_tokens=N_NEW, eos_id=None)
  eos = next(t for t in free[0][1:] if t > BOS)
  tokenizer.eos_token = f"w{eos}"  # pretend this word is EOS, so row 0 stops
  got = sample.generate_text(p, GEMMA2, tokenizer, texts, max_new_tokens=N_NEW)
  for (text, stopped), row in zip(got, free):
    cut = row[:row.index(eos)] if eos in row else row
    # ids 0..2 are special tokens, which decoding drops
    assert text == " ".join(f"w{t}" for t in cut if t > BOS)
    assert stopped == (eos in row)
  assert got[0][1]


def test_bad_input_raises(params):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sample.generate(params["gemma2"], GEMMA2, [[BOS], []], max_new_tokens=N_NEW)
  with pytest.raises(ValueError, match="top_p"):
    sample.generate(params["gemma2"], GEMMA2, [[BOS]], max_new_tokens=2, top_p=0.0)
  assert sample.generate(params["gemma2"], GEMMA2, [[BOS]], max_new_tokens=0) == [[]]


# ---------------------------------------------------------------------------------------------
# Against transformers


# transformers models shaped like GEMMA2 and GEMMA3 (but with transformers' default soft-caps and
# no rope scaling: the test reads their config back), every weight redrawn as large as in
# random_params so that greedy paths diverge on any error.
HF_TWINS = {
    "gemma2": dict(num_hidden_layers=4, num_key_value_heads=2, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3": dict(num_hidden_layers=6, num_key_value_heads=1, rope_scaling=None),
}


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_greedy_matches_transformers(tmp_path, family):
  if importlib.util.find_spec("jax_it.weights") is None:
    pytest.skip("jax_it.weights is not written yet; it loads the transformers checkpoint")
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")

  from jax_it import reference as ref
  from jax_it import weights

  hf = ref.tiny_hf(family, vocab_size=V, intermediate_size=64, sliding_window=6,
                   query_pre_attn_scalar=8, initializer_range=0.02, pad_token_id=PAD,
                   eos_token_id=EOS, bos_token_id=BOS, weight_std=0.3, embed_std=0.1,
                   save_to=tmp_path, **HF_TWINS[family])
  p, cfg = weights.load(str(tmp_path))
  prompts = random_prompts([5, 9], seed=9)
  ours = sample.generate(p, cfg, prompts, max_new_tokens=N_NEW, eos_id=EOS, pad_id=PAD)
  for prompt, got in zip(prompts, ours):
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=N_NEW, do_sample=False,
                       eos_token_id=EOS, pad_token_id=PAD)[0, len(prompt):].tolist()
    assert got == want
