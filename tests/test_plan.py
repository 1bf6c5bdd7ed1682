"""The memory plan: its byte counts against real arrays, XLA's own figures and a 4-device mesh.

Run as a script (`python tests/test_plan.py devices`, 4 CPU devices) it prints the 4-device
figures that test_sharded_plan_divides_the_base_over_4_devices checks.
"""

import collections
import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_it import config, families, lora, model, quant, train
from jax_it.run import plan

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_YAML = os.path.join(HERE, os.pardir, "configs", "tiny.yaml")
# the tiny preset with a smaller table: the same code paths (2 vocabulary blocks in the loss)
MCFG = dataclasses.replace(families.PRESETS["gemma2-tiny"], vocab_size=4096)


def base_params(dtype=jnp.float32):
  """Arrays of model.init_params' tree, shapes and dtypes (zeros: init's random ops compile for
  seconds, and only the bytes matter here)."""
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), MCFG, dtype))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cfg_of(*overrides):
  return config.load_config(TINY_YAML, list(overrides))


def one_device():
  return train.make_mesh(jax.devices()[:1])


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def shapes_plan(*overrides, mesh=None, params=None):
  """The plan without compiling (temporaries estimated)."""
  return plan.memory_plan(cfg_of(*overrides), MCFG, mesh or one_device(), params,
                          compile_step=False)


# ---------------------------------------------------------------------------------------------
# Base params, LoRA, optimizer: exact byte counts


def test_base_params_are_the_bytes_of_the_params_load_model_makes():
  c = MCFG
  L, V, D, F, N, K, H = (c.num_layers, c.vocab_size, c.embed_dim, c.hidden_dim, c.num_heads,
                         c.num_kv_heads, c.head_dim)
  # embedding, q, kv, o, gate+up, down, 4 norms per layer (Gemma 2), the final norm; float32
  by_hand = 4 * (V * D + L * (N * D * H + 2 * K * D * H + N * H * D + 3 * D * F + 4 * D) + D)
  params = base_params()
  assert shapes_plan()["base_params"] == by_hand == nbytes(params)
  assert shapes_plan(params=params)["base_params"] == by_hand


def test_bfloat16_halves_the_base_and_int8_shrinks_it_further():
  f32, bf16 = shapes_plan()["base_params"], shapes_plan("model.dtype=bfloat16")["base_params"]
  int8 = shapes_plan("model.quant=int8", "model.dtype=bfloat16")["base_params"]
  assert 2 * bf16 == f32
  q = quant.quantize_int8(base_params(jnp.bfloat16))
  assert int8 == nbytes(q)  # the int8 weights, their scales, the norms in bfloat16
  assert f32 / 4 < int8 < 0.6 * bf16
  assert shapes_plan("model.quant=int8", params=q)["base_params"] == int8
  # quantizing the embedding (last, and here the largest weight) holds the bfloat16 base, the
  # int8 layer weights and the embedding in float32 and int8 at once
  p = shapes_plan("model.quant=int8", "model.dtype=bfloat16")
  layers = sum(x.size for x in jax.tree.leaves(q["layers"]) if x.dtype == jnp.int8)
  assert p["quantize_peak"] == bf16 + layers + 5 * MCFG.vocab_size * MCFG.embed_dim
  assert shapes_plan()["quantize_peak"] == 0
  assert "while quantizing to int8" in plan.format_plan(p)


def test_lora_and_adam_state_are_three_copies_of_the_adapter_plus_counters():
  p = shapes_plan("lora.targets=all-linear", "lora.r=8")
  cfg = cfg_of("lora.targets=all-linear", "lora.r=8")
  by_hand = 0
  for target in cfg.lora.targets:  # A [L, *in, r] and B [L, r, *out], float32
    ins, outs = lora.io_shapes(target, MCFG)
    by_hand += 4 * MCFG.num_layers * 8 * (math.prod(ins) + math.prod(outs))
  assert p["lora"] == by_hand
  counters = p["optimizer"] - 2 * p["lora"]  # Adam's mu and nu, then step counts
  assert 0 < counters <= 16
  adapter = jax.eval_shape(lambda: lora.init(jax.random.key(0), MCFG, cfg.lora))
  adapter = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), adapter)
  opt, _ = train.optimizer(cfg.train, 4)
  assert p["optimizer"] == nbytes(opt.init(adapter))


def test_estimated_temporaries_grow_with_batch_and_length():
  base = shapes_plan("train.micro_batches=1")
  wider = shapes_plan("train.micro_batches=1", "train.batch_size=8")
  longer = shapes_plan("train.micro_batches=1", "data.max_len=256")
  assert base["temporaries_source"] == "estimate"
  assert wider["temporaries"] > 1.5 * base["temporaries"]
  assert longer["temporaries"] > 1.5 * base["temporaries"]
  assert shapes_plan("model.remat=true")["temporaries"] < shapes_plan()["temporaries"]


# ---------------------------------------------------------------------------------------------
# The compiled step


@pytest.fixture(scope="module")
def compiled():
  """The tiny config's plan, compiled; "step": the train step it compiled."""
  cfg, mesh = cfg_of(), one_device()
  opt, _ = train.optimizer(cfg.train, cfg.train.max_steps)
  step = train.make_train_step(MCFG, opt, mesh, cfg.train)
  return {4: plan.memory_plan(cfg, MCFG, mesh, step=step), "step": (step, opt)}


def full_batch(rows: int, length: int) -> dict:
  """Random tokens with every position in the loss: the plan's worst case."""
  tokens = np.random.default_rng(0).integers(3, MCFG.vocab_size, (rows, length + 1))
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((rows, length)),
          "positions": np.tile(np.arange(length), (rows, 1)),
          "segment_ids": np.ones((rows, length))}


def same_layout(abstract: dict, placed: dict) -> bool:
  return all(a.shape == p.shape and a.dtype == p.dtype and a.sharding == p.sharding
             for a, p in ((abstract[k], placed[k]) for k in train.BATCH_KEYS))


def test_abstract_batch_is_laid_out_as_prepare_batch_places_a_full_batch():
  cfg, mesh = cfg_of(), one_device()
  placed = train.prepare_batch(full_batch(4, 128), mesh, cfg.train.micro_batches)
  assert set(placed) == set(train.BATCH_KEYS)
  assert same_layout(plan.abstract_batch(cfg, mesh), placed)
  assert plan.abstract_batch(cfg, mesh, capacity=64)["loss_idx"].shape == (2, 64)


def test_compiled_plan_agrees_with_xla_and_adds_up(compiled):
  p = compiled[4]
  assert p["temporaries_source"] == "compiled"
  xla = p["compiled"]
  # XLA's arguments are exactly our base + LoRA + optimizer + batch (+ the key's 8 bytes)
  args = p["base_params"] + p["lora"] + p["optimizer"] + p["batch"]
  assert abs(xla["argument"] - args) <= 8, (xla, args)
  assert p["temporaries"] == xla["temp"] > 0
  assert xla["alias"] >= p["lora"] + p["optimizer"] - 16  # lora and opt_state donated
  assert p["outputs"] < 1024  # only the metrics are new buffers
  assert p["total"] == args + p["temporaries"] + p["outputs"]


def test_device_memory_on_cpu_is_the_hosts_share_and_the_plan_fits(compiled):
  p = compiled[4]
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert p["device_memory_kind"] == "host"
  assert 0 < p["device_memory"] <= host
  assert p["fits"] is True


def test_format_plan_has_a_line_per_component(compiled):
  text = plan.format_plan(compiled[4])
  for label in ("base params (float32, data)", "LoRA weights", "optimizer state",
                "step temporaries (compiled)", "total", "host memory / devices"):
    assert label in text, text
  assert text.splitlines()[-1].split() == ["fits", "yes"]
  assert "MiB" in text
  too_big = dict(compiled[4], device_memory=1, fits=False, device_memory_kind="device")
  assert plan.format_plan(too_big).splitlines()[-1].split() == ["fits", "NO"]
  assert plan._size(3 * 2**30) == "3.00 GiB" and plan._size(512) == "512 B"


def test_the_loops_first_call_reuses_the_plans_compile(compiled):
  """With make_train_step's jitted function exposed (`.jitted`), a call with arrays placed as the
  loop places them compiles nothing more."""
  cfg, mesh = cfg_of(), one_device()
  step, opt = compiled["step"]
  adapter = lora.init(jax.random.key(cfg.lora.seed), MCFG, cfg.lora)
  args = (train.replicate(adapter, mesh), train.replicate(opt.init(adapter), mesh),
          train.replicate(base_params(), mesh),
          train.prepare_batch(full_batch(cfg.train.batch_size, cfg.data.max_len), mesh,
                              cfg.train.micro_batches),
          jax.random.fold_in(jax.random.key(cfg.train.seed), 0))
  compiles = collections.Counter()
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compiles.update([event]) if "backend_compile" in event else None)
  jax.block_until_ready(step(*args)[2])
  assert not compiles, compiles


# ---------------------------------------------------------------------------------------------
# 4 devices (a subprocess: the device count is fixed when JAX starts)


def _four_devices() -> dict:
  """Plans on 4 CPU devices, and the per-device bytes train.shard_params really places."""
  mesh = train.make_mesh()
  dev0 = mesh.devices.flat[0]

  def placed_bytes(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev0)

  params = base_params()
  q = quant.quantize_int8(params, jnp.float32)  # as load_model does for model.dtype=float32
  one = "train.micro_batches=1"
  out = {"devices": jax.device_count(),
         "data": shapes_plan(one, mesh=mesh),
         "sharded": shapes_plan(one, "train.parallel=sharded", mesh=mesh),
         "sharded_int8": shapes_plan(one, "train.parallel=sharded", "model.quant=int8",
                                     mesh=mesh),
         "compiled": plan.memory_plan(cfg_of(one, "train.parallel=sharded"), MCFG, mesh),
         "placed_sharded": placed_bytes(train.shard_params(params, mesh)),
         "placed_sharded_int8": placed_bytes(train.shard_params(q, mesh)),
         "placed_data": placed_bytes(train.replicate(params, mesh)),
         "batch_layout": same_layout(plan.abstract_batch(cfg_of(one), mesh),
                                     train.prepare_batch(full_batch(4, 128), mesh))}
  return out


def test_sharded_plan_divides_the_base_over_4_devices():
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, os.path.abspath(__file__), "devices"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  r = json.loads(run.stdout.strip().splitlines()[-1])
  assert r["devices"] == 4 and r["batch_layout"]
  data, sharded = r["data"], r["sharded"]
  assert data["base_params"] == r["placed_data"]
  assert sharded["base_params"] == r["placed_sharded"]  # the rule of train.shard_params
  assert r["sharded_int8"]["base_params"] == r["placed_sharded_int8"]
  # every tiny-preset tensor has an axis divisible by 4: exactly a quarter each
  assert 4 * sharded["base_params"] == data["base_params"]
  assert data["lora"] == sharded["lora"]  # the adapter stays replicated
  # the batch is split over the devices: a quarter of the 1-device batch (+ the 8-byte key)
  assert 4 * (data["batch"] - 8) == shapes_plan("train.micro_batches=1")["batch"] - 8
  c = r["compiled"]
  args = c["base_params"] + c["lora"] + c["optimizer"] + c["batch"]
  assert c["temporaries_source"] == "compiled" and abs(c["compiled"]["argument"] - args) <= 8
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert data["device_memory"] <= host // 4


if __name__ == "__main__" and sys.argv[1:] == ["devices"]:
  print(json.dumps(_four_devices()))


def test_plan_command_prints_the_plan_of_a_config():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, os.path.join(root, "run.py"), "plan", "--config",
                        os.path.join(root, "configs", "tiny.yaml"), "train.batch_size=8"], cwd=root,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert "global batch 8 x 128 tokens" in lines[0]
  assert lines[1] == "memory per device (1 x cpu):"
  assert any(line.split()[:3] == ["step", "temporaries", "(compiled)"] for line in lines)
  assert lines[-1].split() == ["fits", "yes"]
