"""Runs one train step under several device layouts; used by test_train.py in subprocesses.

  python multidevice.py devices          4 forced CPU devices: data-parallel, micro-batched, sharded
  python multidevice.py single           1 device, the reference for the two-process run
  python multidevice.py process PORT I   process I of 2, each with 2 CPU devices, over loopback:
                                         data-parallel and sharded
"""

import json
import sys

import jax
import numpy as np

MODE = sys.argv[1]
if MODE == "devices":
  jax.config.update("jax_num_cpu_devices", 4)
elif MODE == "process":
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[2]}", num_processes=2,
                             process_id=int(sys.argv[3]))

from jax_it import lora, model, train  # noqa: E402  (after the device set-up)

CFG = model.ModelConfig(
    family="gemma2", num_layers=2, vocab_size=96, embed_dim=16, hidden_dim=32, num_heads=4,
    num_kv_heads=2, head_dim=8, query_pre_attn_scalar=8, attn_logits_soft_cap=50.0,
    final_logit_soft_cap=30.0, sliding_window=4, local_layers=(True, False))


def setup():
  params = model.init_params(jax.random.key(0), CFG)
  adapter = lora.init(jax.random.key(1), CFG, lora.LoraConfig(r=2, targets="all-linear"))
  adapter = adapter.replace(weights=jax.tree.map(lambda x: x + 0.02, adapter.weights))
  rng = np.random.default_rng(0)
  B, T = 8, 12
  tokens = rng.integers(3, CFG.vocab_size, (B, T + 1))
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.tile(np.arange(T), (B, 1)), "segment_ids": np.ones((B, T)),
           "loss_mask": rng.random((B, T)) < 0.6}
  return params, adapter, batch


def one_step(devices, opts, rows=slice(None)):
  params, adapter, batch = setup()
  mesh = train.make_mesh(devices)
  opt = train.make_optimizer(train.make_schedule(1e-2, 10), weight_decay=0.01)
  step = train.make_train_step(CFG, opt, mesh, opts)
  params = train.shard_params(params, mesh) if opts.parallel == "sharded" else train.replicate(
      params, mesh)
  held = {}  # base-param bytes each of this process's devices holds
  for x in jax.tree.leaves(params):
    for shard in x.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  local = {k: v[rows] for k, v in batch.items()}
  new, _, metrics = step(train.replicate(adapter, mesh), train.replicate(opt.init(adapter), mesh),
                         params, train.prepare_batch(local, mesh, opts.micro_batches, multiple=4))
  flat = np.concatenate([np.asarray(jax.device_get(x)).ravel() for x in jax.tree.leaves(
      jax.experimental.multihost_utils.process_allgather(new, tiled=True))])
  return {"loss": float(metrics["loss"]), "lora": flat,
          "param_share": sorted(b / total for b in held.values())}


def main():
  import jax.experimental.multihost_utils  # noqa: F401
  if MODE == "devices":
    S = train.TrainConfig
    runs = {"1dev": one_step(jax.devices()[:1], S(loss_chunk=8)),
            "4dev_data": one_step(jax.devices(), S(loss_chunk=8)),
            "4dev_data_micro2": one_step(jax.devices(), S(loss_chunk=8, micro_batches=2)),
            "4dev_sharded": one_step(jax.devices(), S(loss_chunk=8, parallel="sharded"))}
    ref = runs["1dev"]["lora"]
    out = {k: {"loss": v["loss"], "lora_max_diff": float(np.abs(v["lora"] - ref).max())}
           for k, v in runs.items()}
  else:
    i, n = jax.process_index(), jax.process_count()
    half = 8 // n
    mine = slice(i * half, (i + 1) * half)
    r = one_step(jax.devices(), train.TrainConfig(loss_chunk=8), mine)
    s = one_step(jax.devices(), train.TrainConfig(loss_chunk=8, parallel="sharded"), mine)
    out = {"loss": r["loss"], "lora": r["lora"].tolist(), "devices": jax.device_count(),
           "processes": n, "sharded_loss": s["loss"], "sharded_lora": s["lora"].tolist(),
           "sharded_param_share": s["param_share"], "data_param_share": r["param_share"]}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
