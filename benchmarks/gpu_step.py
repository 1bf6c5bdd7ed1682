"""Gemma 2 2B-shaped bf16 LoRA step on one GPU: ours (JAX) vs transformers + PEFT, tokens/s, MFU.

Usage: python benchmarks/gpu_step.py [--batch 8] [--length 1024] [--steps 5] [--rounds 3]
           [--loss-share 0.5] [--peak-tflops 989] [--out results.md]
       python benchmarks/gpu_step.py --smoke     # tiny model on CPU: checks the script works

Random weights: transformers builds the model from ckpt.hf.hf_config (on the GPU, in bfloat16),
saves it, and our side reads that folder with weights.load, so both sides hold the same weights
and start from the same PEFT adapter (saved by lora.save_peft). Both live in this one process
(JAX does not preallocate GPU memory here); timing loops alternate between the sides. Batches
are random tokens without padding; the loss covers the last `loss-share` of each row (a response
after a prompt). MFU = model FLOPs / (seconds * peak), FLOPs counted by common.step_flops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import common  # pylint: disable=wrong-import-position  # benchmarks/ is on sys.path

LORA_R, LORA_ALPHA, LR = 8, 16.0, 2e-4


def build_hf(cfg, device: str, out_dir: str):
  """A random transformers model of cfg's shape in bfloat16 on `device`, saved to out_dir."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

  from jax_it.ckpt import hf as hf_ckpt  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  with torch.device(device):  # initialise where it will run: no host copy of 2.6B parameters
    hf = AutoModelForCausalLM.from_config(hf_ckpt.hf_config(cfg), attn_implementation="eager",
                                          dtype=torch.bfloat16)
  hf.save_pretrained(out_dir)
  return hf


class TorchSide:
  """transformers + PEFT on `device`; AdamW over the LoRA weights."""

  def __init__(self, hf, adapter_dir: str, batch: dict, device: str):
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.device = torch, device
    self.model = peft.PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True).train()
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01)
    as_t = lambda x: torch.as_tensor(x, dtype=torch.long, device=device)
    ignore = torch.as_tensor(batch["loss_mask"] == 0, device=device)
    self.tokens, self.targets = as_t(batch["tokens"]), as_t(batch["targets"]).masked_fill(
        ignore, -100)

  def step(self) -> float:
    F = self.torch.nn.functional
    logits = self.model(input_ids=self.tokens, use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten(), ignore_index=-100)
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.detach()

  def run(self, steps: int) -> tuple[float, float]:
    self._sync()
    t = time.perf_counter()
    for _ in range(steps):
      loss = self.step()
    self._sync()
    return (time.perf_counter() - t) / steps, float(loss)

  def _sync(self):
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()

  def peak_gb(self) -> float | None:
    if not self.device.startswith("cuda"):
      return None
    return self.torch.cuda.max_memory_allocated() / 1e9


class OurSide:
  """Our jitted step on the weights transformers saved."""

  def __init__(self, hf_dir: str, adapter_dir: str, batch: dict):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from jax_it import lora, train, weights  # pylint: disable=g-import-not-at-top
    params, self.cfg = weights.load(hf_dir, dtype=jnp.bfloat16)
    self.mesh = train.make_mesh()
    self.params = train.replicate(params, self.mesh)
    del params
    opt = train.make_optimizer(LR, weight_decay=0.01, clip_norm=None)
    adapter = lora.load_peft(adapter_dir, self.cfg)
    self.adapter = train.replicate(adapter, self.mesh)
    self.opt_state = train.replicate(opt.init(adapter), self.mesh)
    self.fn = train.make_train_step(self.cfg, opt, self.mesh)
    self.batch = train.shard_batch(train.add_loss_index(batch), self.mesh)

  def step(self):
    self.adapter, self.opt_state, m = self.fn(self.adapter, self.opt_state, self.params,
                                              self.batch)
    return m["loss"]

  def run(self, steps: int) -> tuple[float, float]:
    import jax  # pylint: disable=g-import-not-at-top
    t = time.perf_counter()
    for _ in range(steps):
      loss = self.step()
    jax.block_until_ready((self.adapter, loss))
    return (time.perf_counter() - t) / steps, float(loss)

  def peak_gb(self) -> float | None:
    import jax  # pylint: disable=g-import-not-at-top
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def setup(args, workdir: str):
  """Both sides on the same weights, adapter and batch; returns (cfg, batch, sides)."""
  import jax  # pylint: disable=g-import-not-at-top

  from jax_it import families, lora  # pylint: disable=g-import-not-at-top

  cfg = families.PRESETS["gemma2-tiny" if args.smoke else "gemma2-2b"]
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  t = time.perf_counter()
  hf = build_hf(cfg, device, os.path.join(workdir, "hf"))
  adapter = lora.init(jax.random.key(0), cfg, lora.LoraConfig(r=LORA_R, alpha=LORA_ALPHA))
  lora.save_peft(adapter, cfg, os.path.join(workdir, "adapter"))
  batch = common.random_batch(args.batch, args.length, cfg.vocab_size, args.loss_share)
  sides = {"ours": OurSide(os.path.join(workdir, "hf"), os.path.join(workdir, "adapter"), batch),
           "torch": TorchSide(hf, os.path.join(workdir, "adapter"), batch, device)}
  print(f"set-up {time.perf_counter() - t:.1f} s on {device} ({jax.devices()[0].device_kind})",
        flush=True)
  return cfg, batch, sides


def measure(args, sides: dict) -> dict:
  """Warm-up (compile) steps, then alternating timed loops; median seconds per step."""
  first = {}
  for name, side in sides.items():
    t = time.perf_counter()
    _, first[name] = side.run(1)  # the first step's loss: same weights, same adapter
    print(f"  {name}: first step {time.perf_counter() - t:.1f} s, loss {first[name]:.4f}",
          flush=True)
    side.run(args.warmup)
  times = {name: [] for name in sides}
  for r in range(args.rounds):
    for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
      times[name].append(sides[name].run(args.steps)[0])
    print(f"  round {r + 1}: " + ", ".join(f"{n} {v[-1]:.3f} s/step" for n, v in times.items()),
          flush=True)
  return {name: {"step_s": statistics.median(v), "first_loss": first[name],
                 "peak_gb": sides[name].peak_gb()} for name, v in times.items()}


def table(args, cfg, batch, res: dict) -> str:
  tokens = batch["tokens"].size
  peak = args.peak_tflops * 1e12
  rows = {"ours": common.our_logit_rows(batch), "torch": tokens}
  lines = ["| side | s/step | tokens/s | vs torch | model TFLOP/step | MFU | peak device GB "
           "| first-step loss |", "|---|---|---|---|---|---|---|---|"]
  for name, r in res.items():
    flops = common.step_flops(cfg, args.batch, args.length, rows[name], r=LORA_R)
    mem = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
    lines.append(f"| {name} | {r['step_s']:.3f} | {tokens / r['step_s']:.0f} "
                 f"| {res['torch']['step_s'] / r['step_s']:.2f}x | {flops / 1e12:.3g} "
                 f"| {100 * flops / (r['step_s'] * peak):.3g}% | {mem} "
                 f"| {r['first_loss']:.4f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny preset, small batch (runs on CPU)")
  ap.add_argument("--batch", type=int, default=None, help="rows (8; smoke 2)")
  ap.add_argument("--length", type=int, default=None, help="tokens per row (1024; smoke 64)")
  ap.add_argument("--steps", type=int, default=5, help="steps per timed loop")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  ap.add_argument("--rounds", type=int, default=3, help="alternating timed loops per side")
  ap.add_argument("--loss-share", type=float, default=0.5, help="share of positions in the loss")
  ap.add_argument("--peak-tflops", type=float, default=989.0,
                  help="dense bf16 peak of the chip (H100/H200 SXM: 989)")
  ap.add_argument("--out", default="", help="also write the markdown section to this file")
  args = ap.parse_args()
  args.batch = args.batch or (2 if args.smoke else 8)
  args.length = args.length or (64 if args.smoke else 1024)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    cfg, batch, sides = setup(args, workdir)
    res = measure(args, sides)
  import jax  # pylint: disable=g-import-not-at-top
  text = common.section(
      f"gpu_step.py: Gemma 2 {'tiny (smoke)' if args.smoke else '2B'}-shaped bf16 LoRA step, "
      "ours vs transformers + PEFT (eager)",
      f"batch {args.batch} x {args.length} random tokens, loss on the last "
      f"{args.loss_share:.0%} of each row, LoRA r={LORA_R} on q_proj, v_proj; MFU against "
      f"{args.peak_tflops:g} TFLOP/s; {args.rounds} rounds of {args.steps} steps",
      f"{table(args, cfg, batch, res)}\n\ntotal {time.perf_counter() - start:.0f} s",
      host=f"{jax.devices()[0].device_kind} device; host {common.machine()}")
  print(text)
  if args.out:
    common.record(text, args.out)


if __name__ == "__main__":
  main()
