"""Gemma 2 2B-shaped bf16 LoRA step on one GPU: ours (JAX) vs transformers + PEFT, tokens/s, MFU.

Usage: python benchmarks/gpu_step.py [--lengths 1024,4096] [--tokens 8192] [--steps 5]
           [--rounds 3] [--loss-share 0.5] [--peak-tflops 989] [--out results.md]
       python benchmarks/gpu_step.py --smoke     # tiny model on CPU: checks the script works

Random weights: transformers builds the model from ckpt.hf.hf_config (on the GPU, in bfloat16),
saves it, and our side reads that folder with weights.load, so both sides hold the same weights
and start each row length from the same PEFT adapter (saved by lora.save_peft). Torch gets its
best: bfloat16 weights and, on CUDA, transformers' flex_attention (compiled kernels that keep
Gemma 2's soft-cap; transformers refuses sdpa for Gemma 2 and flash-attn is not installed
there), eager where flex does not run. Both live in this one process (JAX does not preallocate
GPU memory here); timing loops alternate between the sides. Each row length gets `--tokens`
tokens per step (8 x 1024, 2 x 4096). Batches are random tokens without padding; the loss
covers the last `loss-share` of each row (a response after a prompt). MFU = model FLOPs /
(seconds * peak), FLOPs counted by common.step_flops. Peak device memory: torch's
max_memory_allocated since the length began; ours the step's live buffers (weights, adapter,
optimizer state, batch) plus the compiled step's temporaries (XLA's memory analysis). "start s":
setting up the length and its first step, our compile or torch's warm-up included.
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


def build_hf(cfg, device: str, out_dir: str, attention: str):
  """A random transformers model of cfg's shape in bfloat16 on `device`, saved to out_dir."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

  from jax_it.ckpt import hf as hf_ckpt  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  with torch.device(device):  # initialise where it will run: no host copy of 2.6B parameters
    hf = AutoModelForCausalLM.from_config(hf_ckpt.hf_config(cfg), attn_implementation=attention,
                                          dtype=torch.bfloat16)
  hf.save_pretrained(out_dir)
  return hf


class TorchSide:
  """transformers + PEFT on `device`; AdamW over the LoRA weights."""

  def __init__(self, hf, adapter_dir: str, device: str):
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.device, self.adapter_dir = torch, device, adapter_dir
    self.model = peft.PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True).train()

  def start(self, batch: dict):
    """The saved adapter again, a fresh optimizer, this batch; the peak counter reset."""
    import peft  # pylint: disable=g-import-not-at-top
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    torch = self.torch
    peft.set_peft_model_state_dict(
        self.model, load_file(os.path.join(self.adapter_dir, "adapter_model.safetensors")))
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01)
    as_t = lambda x: torch.as_tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
    ignore = torch.as_tensor(batch["loss_mask"] == 0, device=self.device)
    self.tokens, self.targets = as_t(batch["tokens"]), as_t(batch["targets"]).masked_fill(
        ignore, -100)
    if self.device.startswith("cuda"):
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()

  def step(self):
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

  def __init__(self, hf_dir: str, adapter_dir: str):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from jax_it import train, weights  # pylint: disable=g-import-not-at-top
    params, self.cfg = weights.load(hf_dir, dtype=jnp.bfloat16)
    self.mesh = train.make_mesh()
    self.params = train.replicate(params, self.mesh)
    del params
    self.adapter_dir = adapter_dir
    self.opt = train.make_optimizer(LR, weight_decay=0.01, clip_norm=None)
    self.fn = train.make_train_step(self.cfg, self.opt, self.mesh)

  def start(self, batch: dict):
    import jax  # pylint: disable=g-import-not-at-top

    from jax_it import lora, train  # pylint: disable=g-import-not-at-top
    adapter = lora.load_peft(self.adapter_dir, self.cfg)
    self.adapter = train.replicate(adapter, self.mesh)
    self.opt_state = train.replicate(self.opt.init(adapter), self.mesh)
    self.batch = train.shard_batch(train.add_loss_index(batch), self.mesh)
    state = (self.adapter, self.opt_state, self.params, self.batch)
    self.live = sum(x.nbytes for x in jax.tree.leaves(state))
    self.temp = None
    try:
      mem = self.fn.jitted.lower(*state, jax.random.key(0)).compile().memory_analysis()
      self.temp = mem.temp_size_in_bytes if mem is not None else None
    except Exception as e:  # pylint: disable=broad-except  # not every backend reports it
      print(f"  (no memory analysis of our step: {type(e).__name__}: {str(e)[:120]})")

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
    return None if self.temp is None else (self.live + self.temp) / 1e9


def setup(args, workdir: str):
  """Both sides on the same weights and adapter; returns (cfg, sides)."""
  import jax  # pylint: disable=g-import-not-at-top

  from jax_it import families, lora  # pylint: disable=g-import-not-at-top

  cfg = families.PRESETS["gemma2-tiny" if args.smoke else "gemma2-2b"]
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  t = time.perf_counter()
  hf = None
  if args.torch_attention == "auto":
    args.torch_attention = "eager"
    if device == "cuda":
      try:  # torch's fastest Gemma 2 attention with the soft-cap: compiled flex attention
        hf = build_hf(cfg, device, os.path.join(workdir, "hf"), "flex_attention")
        import torch  # pylint: disable=g-import-not-at-top
        tokens = torch.zeros((1, 256), dtype=torch.long, device=device)
        hf(input_ids=tokens).logits.float().sum().backward()
        hf.zero_grad(set_to_none=True)
        args.torch_attention = "flex_attention"
      except Exception as e:  # pylint: disable=broad-except
        print(f"torch flex_attention failed ({type(e).__name__}: {str(e)[:200]}); eager instead",
              flush=True)
        hf = None
  if hf is None:
    hf = build_hf(cfg, device, os.path.join(workdir, "hf"), args.torch_attention)
  adapter = lora.init(jax.random.key(0), cfg, lora.LoraConfig(r=LORA_R, alpha=LORA_ALPHA))
  lora.save_peft(adapter, cfg, os.path.join(workdir, "adapter"))
  sides = {"ours": OurSide(os.path.join(workdir, "hf"), os.path.join(workdir, "adapter")),
           "torch": TorchSide(hf, os.path.join(workdir, "adapter"), device)}
  print(f"set-up {time.perf_counter() - t:.1f} s on {device} ({jax.devices()[0].device_kind})",
        flush=True)
  return cfg, sides


def measure(args, sides: dict, batch: dict) -> dict:
  """Per side: the first step (compile), warm-up steps, then alternating timed loops; median
  seconds per step."""
  first = {}
  for name, side in sides.items():
    t = time.perf_counter()
    side.start(batch)
    _, loss = side.run(1)  # the first step's loss: same weights, same adapter
    first[name] = (loss, time.perf_counter() - t)
    print(f"  {name}: start and first step {first[name][1]:.1f} s, loss {loss:.4f}", flush=True)
    side.run(args.warmup)
  times = {name: [] for name in sides}
  for r in range(args.rounds):
    for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
      times[name].append(sides[name].run(args.steps)[0])
    print(f"  round {r + 1}: " + ", ".join(f"{n} {v[-1]:.3f} s/step" for n, v in times.items()),
          flush=True)
  return {name: {"step_s": statistics.median(v), "first_loss": first[name][0],
                 "first_s": first[name][1], "peak_gb": sides[name].peak_gb()}
          for name, v in times.items()}


def table(args, cfg, results: dict) -> str:
  peak = args.peak_tflops * 1e12
  lines = ["| rows x tokens | side | s/step | tokens/s | vs torch | model TFLOP/step | MFU "
           "| peak device GB | start s | first-step loss |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for (rows, length), (batch, res) in results.items():
    tokens = batch["tokens"].size
    logit_rows = {"ours": common.our_logit_rows(batch), "torch": tokens}
    for name, r in res.items():
      flops = common.step_flops(cfg, rows, length, logit_rows[name], r=LORA_R)
      mem = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
      lines.append(f"| {rows} x {length} | {name} | {r['step_s']:.3f} "
                   f"| {tokens / r['step_s']:.0f} | {res['torch']['step_s'] / r['step_s']:.2f}x "
                   f"| {flops / 1e12:.3g} | {100 * flops / (r['step_s'] * peak):.3g}% | {mem} "
                   f"| {r['first_s']:.1f} | {r['first_loss']:.4f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny preset, small batches (runs on CPU)")
  ap.add_argument("--lengths", default=None, help="tokens per row, comma-separated "
                  "(1024,4096; smoke 64)")
  ap.add_argument("--tokens", type=int, default=None, help="tokens per step (8192; smoke 128)")
  ap.add_argument("--steps", type=int, default=5, help="steps per timed loop")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  ap.add_argument("--rounds", type=int, default=3, help="alternating timed loops per side")
  ap.add_argument("--loss-share", type=float, default=0.5, help="share of positions in the loss")
  ap.add_argument("--torch-attention", default="auto",
                  help="transformers attn_implementation; auto: flex_attention on CUDA, where it "
                  "runs, else eager (Gemma 2 has no sdpa path; flex has no CPU backward)")
  ap.add_argument("--peak-tflops", type=float, default=989.0,
                  help="dense bf16 peak of the chip (H100/H200 SXM: 989)")
  ap.add_argument("--out", default="", help="also write the markdown section to this file")
  args = ap.parse_args()
  lengths = [int(x) for x in (args.lengths or ("64" if args.smoke else "1024,4096")).split(",")]
  tokens = args.tokens or (128 if args.smoke else 8192)
  if args.smoke:
    args.steps, args.warmup, args.rounds = min(args.steps, 2), min(args.warmup, 1), 2
  start = time.perf_counter()
  results = {}
  with tempfile.TemporaryDirectory() as workdir:
    cfg, sides = setup(args, workdir)
    for length in lengths:
      rows = max(1, tokens // length)
      print(f"{rows} x {length} tokens", flush=True)
      batch = common.random_batch(rows, length, cfg.vocab_size, args.loss_share)
      results[(rows, length)] = (batch, measure(args, sides, batch))
  import jax  # pylint: disable=g-import-not-at-top
  text = common.section(
      f"gpu_step.py: Gemma 2 {'tiny (smoke)' if args.smoke else '2B'}-shaped bf16 LoRA step, "
      f"ours vs transformers + PEFT ({args.torch_attention} attention)",
      f"{tokens} random tokens per step, loss on the last {args.loss_share:.0%} of each row, "
      f"LoRA r={LORA_R} on q_proj, v_proj; MFU against {args.peak_tflops:g} TFLOP/s; "
      f"{args.rounds} rounds of {args.steps} steps per side and length",
      f"{table(args, cfg, results)}\n\ntotal {time.perf_counter() - start:.0f} s",
      host=f"{jax.devices()[0].device_kind} device; host {common.machine()}")
  print(text)
  if args.out:
    common.record(text, args.out)


if __name__ == "__main__":
  main()
