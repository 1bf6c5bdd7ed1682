"""The train step: parity with a torch + PEFT loop, base params untouched, packing, devices."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jax_it import lora, train
from jax_it import reference as ref

HERE = os.path.dirname(__file__)


def test_training_curve_matches_torch_peft(tiny, tmp_path):
  """20 AdamW steps with warmup, linear decay, weight decay and clipping, on both sides."""
  import transformers

  hf, params, cfg = tiny
  steps, lr, wd, warmup = 20, 2e-2, 0.01, 5
  pm = ref.peft_model(hf, ("q_proj", "v_proj", "down_proj"), r=4, alpha=8.0, std=0.05)
  try:
    pm.save_pretrained(tmp_path / "init")
    adapter = lora.load_peft(str(tmp_path / "init"), cfg)
    rng = np.random.default_rng(0)
    batches = [ref.random_batch(rng, 4, 24, cfg.vocab_size) for _ in range(4)]

    trainable = [p for n, p in pm.named_parameters() if "lora_" in n]
    opt_t = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    sched_t = transformers.get_linear_schedule_with_warmup(opt_t, warmup, steps)
    torch_losses = []
    for s in range(steps):
      b = batches[s % len(batches)]
      loss = ref.masked_nll(pm(torch.as_tensor(b["tokens"], dtype=torch.long)).logits,
                            b["targets"], b["loss_mask"])
      loss.backward()
      torch.nn.utils.clip_grad_norm_(trainable, 1.0)
      opt_t.step()
      sched_t.step()
      opt_t.zero_grad()
      torch_losses.append(loss.item())
  finally:
    pm.unload()

  opt = train.make_optimizer(train.make_schedule(lr, steps, warmup), weight_decay=wd)
  step = train.make_train_step(cfg, opt, train.make_mesh(jax.devices()[:1]),
                               train.TrainConfig(loss_chunk=32))
  opt_state = opt.init(adapter)
  losses = []
  for s in range(steps):
    batch = train.add_loss_index(batches[s % len(batches)])
    adapter, opt_state, metrics = step(adapter, opt_state, params, batch)
    losses.append(float(metrics["loss"]))
  diffs = np.abs(np.asarray(losses) - np.asarray(torch_losses))
  assert diffs.max() <= 1e-3, (losses, torch_losses)
  assert losses[16] < losses[0] - 0.05  # it really trained (steps 0 and 16 see one batch)


def test_step_leaves_base_params_and_zero_b_gives_base_loss(tiny):
  _, params, cfg = tiny
  before = jax.tree.map(lambda x: np.asarray(x).copy(), params)
  batch = train.add_loss_index(ref.random_batch(np.random.default_rng(1), 2, 16, cfg.vocab_size))
  adapter = lora.init(jax.random.key(0), cfg, lora.LoraConfig(r=4, targets="all-linear"))
  opts = train.TrainConfig(loss_chunk=16)
  base_loss = train.mean_loss(None, params, batch, cfg, opts)
  opt = train.make_optimizer(train.make_schedule(1e-2, 10))
  step = train.make_train_step(cfg, opt, train.make_mesh(jax.devices()[:1]), opts)
  new, _, metrics = step(adapter, opt.init(adapter), params, batch)
  # same math, two compiled programs (forward-only vs value-and-grad): equal up to rounding
  np.testing.assert_allclose(float(metrics["loss"]), float(base_loss), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, np.asarray(y))
  assert float(jnp.abs(new.weights["q_proj"]["b"]).max()) > 0  # B moved, A/B are the only state


def test_packed_loss_equals_token_weighted_mean_of_single_examples(tiny):
  _, params, cfg = tiny
  rng = np.random.default_rng(2)
  lengths, T = (7, 11, 5), 24
  examples = [rng.integers(3, cfg.vocab_size, n + 1) for n in lengths]
  masks = [rng.random(n) < 0.7 for n in lengths]
  for m in masks:
    m[-1] = True
  packed = {k: np.zeros((1, T), np.int32) for k in ("tokens", "targets", "positions",
                                                    "segment_ids")}
  packed["loss_mask"] = np.zeros((1, T), bool)
  start, sums, counts = 0, [], []
  for seg, (ex, m) in enumerate(zip(examples, masks), 1):
    n = len(ex) - 1
    sl = slice(start, start + n)
    packed["tokens"][0, sl], packed["targets"][0, sl] = ex[:-1], ex[1:]
    packed["positions"][0, sl], packed["segment_ids"][0, sl] = np.arange(n), seg
    packed["loss_mask"][0, sl] = m
    start += n
    single = {"tokens": ex[None, :-1], "targets": ex[None, 1:], "positions": np.arange(n)[None],
              "segment_ids": np.ones((1, n)), "loss_mask": m[None]}
    s, c = train.loss_sum(None, params, train.add_loss_index(single), cfg)
    sums.append(float(s))
    counts.append(float(c))
  packed_loss = float(train.mean_loss(None, params, train.add_loss_index(packed), cfg))
  expected = sum(sums) / sum(counts)
  assert abs(packed_loss - expected) / expected <= 1e-5


def _run(args, env_extra=None, timeout=600):
  env = dict(os.environ, **(env_extra or {}))
  out = subprocess.run([sys.executable, os.path.join(HERE, "multidevice.py"), *args],
                       capture_output=True, text=True, timeout=timeout, env=env, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_data_parallel_and_sharded_steps_equal_one_device():
  res = _run(["devices"])
  one = res["1dev"]
  for name in ("4dev_data", "4dev_data_micro2", "4dev_sharded"):
    assert abs(res[name]["loss"] - one["loss"]) <= 1e-5, (name, res)
    assert res[name]["lora_max_diff"] <= 1e-5, (name, res)


def test_two_processes_give_the_one_process_loss_data_parallel_and_sharded():
  """2 processes x 2 devices; with train.parallel=sharded each device holds a quarter of the
  base params (read from the arrays' shards), replicated each holds all of them."""
  port = str(12000 + os.getpid() % 5000)
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multidevice.py"), "process",
                             port, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
  single = _run(["single"])
  for r in results:
    assert r["devices"] == 4 and r["processes"] == 2
    assert abs(r["loss"] - single["loss"]) <= 1e-5, (r["loss"], single["loss"])
    assert np.abs(np.asarray(r["lora"]) - np.asarray(single["lora"])).max() <= 1e-5
    assert abs(r["sharded_loss"] - single["loss"]) <= 1e-5, (r["sharded_loss"], single["loss"])
    assert np.abs(np.asarray(r["sharded_lora"]) - np.asarray(single["lora"])).max() <= 1e-5
    assert r["data_param_share"] == [1.0, 1.0]
    assert r["sharded_param_share"] == [0.25, 0.25], r["sharded_param_share"]


def test_training_batches_carry_the_loss_capacity_all_processes_compute_alike():
  """A training batch's global loss counts give the capacity C the rows themselves give (no
  collective needed on N processes), with 2 micro-batches."""
  rng = np.random.default_rng(0)
  mask = (rng.random((8, 16)) < rng.random((8, 1))).astype(np.float32)
  batch = {"tokens": rng.integers(3, 50, (8, 16)), "targets": rng.integers(3, 50, (8, 16)),
           "positions": np.tile(np.arange(16), (8, 1)), "segment_ids": np.ones((8, 16)),
           "loss_mask": mask}
  mesh = train.make_mesh(jax.devices()[:1])
  with_counts = dict(batch, batch_loss_counts=(mask > 0).sum(1).astype(np.int32))
  for multiple in (4, 64):
    a = train.prepare_batch(batch, mesh, 2, multiple)
    b = train.prepare_batch(with_counts, mesh, 2, multiple)
    assert a["loss_idx"].shape == b["loss_idx"].shape
    for k in train.BATCH_KEYS:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
