"""Gemma 3 270M LoRA train step, ours (JAX) against transformers + PEFT, on the same Alpaca batches.

Usage: python benchmarks/train_step.py [--batches 3] [--rounds 2] [--dtypes float32,bfloat16]
           [--data DIR] [--no-record]

Each side runs in its own spawned worker process (a clean ru_maxrss per side) that loads the model,
warms up (compiles) on one pass over the batches, then waits; the parent asks the workers for one
timed pass at a time, in interleaved rounds, so slow drifts of a shared machine hit both sides
alike. One phase per parameter dtype keeps at most two workers alive (memory). Our side runs the
pad batches (the very inputs torch gets: the loss comparison) and the same records packed (fewer
rows; our recommended mode). Torch runs in up to three settings, each its own worker, so the ratio
is taken against its best: eager attention (transformers' reference path), sdpa attention, and
sdpa under torch.compile (inductor; its compile happens in the warm-up pass). The tables are
printed and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import pickle
import statistics
import tempfile
import time
import traceback

import common  # benchmarks/ is on sys.path when this file is run as a script

ROWS, MAX_LEN, LORA_R, LORA_ALPHA = 4, 256, 8, 16.0
LR, WEIGHT_DECAY = 2e-4, 0.01


# ---------------------------------------------------------------------------------------------
# Batches and the shared initial adapter


def make_inputs(args, workdir: str, gguf: str) -> dict:
  """Pad and pack batches of the same records, pickled for the workers; the initial adapter."""
  import jax  # pylint: disable=g-import-not-at-top

  from jax_it import lora, weights  # pylint: disable=g-import-not-at-top

  batches = common.alpaca_batches(args.data, weights.load_tokenizer(gguf), ROWS, MAX_LEN,
                                  ROWS * args.batches)
  with open(os.path.join(workdir, "batches.pkl"), "wb") as f:
    pickle.dump(batches, f)
  params, cfg = weights.load(gguf)
  del params
  adapter = lora.init(jax.random.key(0), cfg, lora.LoraConfig(r=LORA_R, alpha=LORA_ALPHA))
  lora.save_peft(adapter, cfg, os.path.join(workdir, "adapter"))
  return {"batches": batches, "cfg": cfg}


def load_batches(workdir: str) -> dict:
  with open(os.path.join(workdir, "batches.pkl"), "rb") as f:
    return pickle.load(f)


# ---------------------------------------------------------------------------------------------
# The two sides (each lives in its own worker process)


class Ours:
  """Our jitted data-parallel step; one adapter/optimizer state per batch mode."""

  def __init__(self, spec: dict):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from jax_it import train, weights  # pylint: disable=g-import-not-at-top

    self.clock = common.CompileClock()
    t = time.perf_counter()
    params, self.cfg = weights.load(spec["gguf"], dtype=jnp.dtype(spec["dtype"]))
    remat = spec["dtype"] == "bfloat16"  # our bfloat16 setting: model.matmul=bfloat16, remat
    if remat:
      self.cfg = dataclasses.replace(self.cfg, matmul_dtype="bfloat16")
    self.mesh = train.make_mesh()
    self.params = train.replicate(params, self.mesh)
    self.opt = train.make_optimizer(LR, weight_decay=WEIGHT_DECAY, clip_norm=None)
    self.step = train.make_train_step(self.cfg, self.opt, self.mesh, remat=remat)
    self.spec, self.batches, self.state = spec, load_batches(spec["workdir"]), {}
    self.load_s = time.perf_counter() - t

  def warmup(self, mode: str) -> dict:
    """First pass from the initial adapter: compiles every batch shape, per-step losses."""
    from jax_it import lora, train  # pylint: disable=g-import-not-at-top
    adapter = lora.load_peft(os.path.join(self.spec["workdir"], "adapter"), self.cfg)
    self.state[mode] = (train.replicate(adapter, self.mesh),
                        train.replicate(self.opt.init(adapter), self.mesh))
    self.clock.take()
    out = self.run(mode, sync_each=True)
    return dict(out, compile_s=self.clock.take())

  def run(self, mode: str, sync_each: bool = False) -> dict:
    import jax  # pylint: disable=g-import-not-at-top

    from jax_it import train  # pylint: disable=g-import-not-at-top
    adapter, opt_state = self.state[mode]
    metrics, step_s = [], []
    start = time.perf_counter()
    for b in self.batches[mode]:
      t = time.perf_counter()
      batch = train.shard_batch(train.add_loss_index(b), self.mesh)
      adapter, opt_state, m = self.step(adapter, opt_state, self.params, batch)
      metrics.append(m)
      if sync_each:
        jax.block_until_ready(m)
        step_s.append(time.perf_counter() - t)
    jax.block_until_ready((adapter, metrics))
    seconds = time.perf_counter() - start
    self.state[mode] = (adapter, opt_state)
    return {"seconds": seconds, "step_s": step_s, "losses": [float(m["loss"]) for m in metrics]}


TORCH_SETTINGS = {"torch": ("eager", False), "torch-sdpa": ("sdpa", False),
                  "torch-compile": ("sdpa", True)}  # side: (attn_implementation, torch.compile)


class Torch:
  """transformers + PEFT in one of TORCH_SETTINGS, AdamW over the LoRA weights, pad batches."""

  def __init__(self, spec: dict):
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

    t = time.perf_counter()
    attention, compiled = TORCH_SETTINGS[spec["side"]]
    kw = dict(attn_implementation=attention, dtype=getattr(torch, spec["dtype"]))
    hf_dir = os.path.join(spec["workdir"], "hf")
    if os.path.exists(os.path.join(hf_dir, "config.json")):  # written by the first torch worker
      hf = AutoModelForCausalLM.from_pretrained(hf_dir, **kw)
    else:  # transformers' own GGUF reader, independent of ours
      gguf = spec["gguf"]
      hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf),
                                                gguf_file=os.path.basename(gguf), **kw)
      _save_plain(hf, hf_dir)
    self.model = peft.PeftModel.from_pretrained(
        hf, os.path.join(spec["workdir"], "adapter"), is_trainable=True).train()
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=WEIGHT_DECAY)
    self.forward = torch.compile(self.model) if compiled else self.model
    self.batches = load_batches(spec["workdir"])
    self.load_s = time.perf_counter() - t

  def warmup(self, mode: str) -> dict:
    t = time.perf_counter()
    out = self.run(mode, sync_each=True)
    return dict(out, compile_s=time.perf_counter() - t)

  def run(self, mode: str, sync_each: bool = False) -> dict:
    losses, step_s = [], []
    start = time.perf_counter()
    for b in self.batches[mode]:
      t = time.perf_counter()
      losses.append(self._step(b))
      step_s.append(time.perf_counter() - t)
    return {"seconds": time.perf_counter() - start, "step_s": step_s if sync_each else [],
            "losses": losses}

  def _step(self, b: dict) -> float:
    import torch  # pylint: disable=g-import-not-at-top
    tokens = torch.as_tensor(b["tokens"], dtype=torch.long)
    attn = torch.as_tensor(b["segment_ids"] > 0, dtype=torch.long)
    logits = self.forward(input_ids=tokens, attention_mask=attn, use_cache=False).logits
    # the loss transformers' own ForCausalLM loss computes: float32 cross-entropy, masked mean
    targets = torch.as_tensor(b["targets"], dtype=torch.long)
    targets = targets.masked_fill(torch.as_tensor(b["loss_mask"] == 0), -100)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                             ignore_index=-100)
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item()


def _save_plain(hf, out_dir: str):
  """The GGUF-loaded model as plain safetensors (save_pretrained refuses GGUF-loaded models)."""
  from safetensors.torch import save_model  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  config = hf.config.to_dict()
  config.pop("quantization_config", None)
  type(hf.config).from_dict(config).save_pretrained(out_dir)
  save_model(hf, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


SIDES = {"ours": Ours, **{name: Torch for name in TORCH_SETTINGS}}


def serve(conn, side: str, spec: dict):
  """Worker main loop: build the side, then answer (method, mode) requests until 'stop'."""
  try:
    obj = SIDES[side](dict(spec, side=side))
    conn.send(("ok", {"load_s": obj.load_s, "rss_gb": common.peak_rss_gb()}))
    while True:
      method, mode = conn.recv()
      if method == "stop":
        return
      out = getattr(obj, method)(mode)
      conn.send(("ok", dict(out, rss_gb=common.peak_rss_gb())))
  except Exception:  # pylint: disable=broad-except  # the parent prints it and stops
    conn.send(("error", traceback.format_exc()))


# ---------------------------------------------------------------------------------------------
# The parent: phases, interleaved rounds, tables


class Worker:
  """A spawned worker (a fresh interpreter: nothing of the parent's memory) and its pipe."""

  def __init__(self, side: str, spec: dict):
    self.conn, child = mp.Pipe()
    self.proc = mp.get_context("spawn").Process(target=serve, args=(child, side, spec))
    self.proc.start()
    self.info = self._recv()

  def ask(self, method: str, mode: str) -> dict:
    self.conn.send((method, mode))
    return self._recv()

  def _recv(self) -> dict:
    status, payload = self.conn.recv()
    if status != "ok":
      self.proc.join(5)
      raise RuntimeError(f"worker {self.proc.pid} failed:\n{payload}")
    return payload

  def stop(self):
    self.conn.send(("stop", None))
    self.proc.join(60)


def run_phase(dtype: str, args, spec: dict) -> dict:
  """Both sides of one dtype: warm-up, then `rounds` interleaved timed passes."""
  spec = dict(spec, dtype=dtype)
  jobs = [("ours", "pad"), ("ours", "pack")]
  jobs += [] if args.no_torch else [(t, "pad") for t in args.torch.split(",")]
  workers = {}
  try:
    for side in dict.fromkeys(s for s, _ in jobs):
      workers[side] = Worker(side, spec)
      print(f"  [{dtype}] {side}: loaded in {workers[side].info['load_s']:.1f} s", flush=True)
    res = {job: {"warmup": workers[job[0]].ask("warmup", job[1]), "seconds": []} for job in jobs}
    for job in jobs:
      print(f"  [{dtype}] {job}: warm-up steps {_fmt(res[job]['warmup']['step_s'])} s, "
            f"compile {res[job]['warmup']['compile_s']:.1f} s", flush=True)
    for r in range(args.rounds):
      for job in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:  # rotate: no fixed position
        out = workers[job[0]].ask("run", job[1])
        res[job]["seconds"].append(out["seconds"])
        res[job]["rss_gb"] = out["rss_gb"]
      print(f"  [{dtype}] round {r + 1}: " + ", ".join(
          f"{s}/{m} {res[(s, m)]['seconds'][-1]:.1f} s" for s, m in jobs), flush=True)
    return {(side, mode, dtype): v for (side, mode), v in res.items()}
  finally:
    for w in workers.values():
      w.stop()


def _fmt(xs) -> str:
  return "[" + ", ".join(f"{x:.1f}" for x in xs) + "]"


def summarize(results: dict, batches: dict, cfg, peaks: dict) -> list[dict]:
  """One row per (side, mode, dtype): median tokens/s, step time, memory, FLOPs."""
  rows = []
  for (side, mode, dtype), res in results.items():
    bs = batches[mode]
    real = sum(int((b["segment_ids"] > 0).sum()) for b in bs)
    logit_rows = [common.our_logit_rows(b) if side == "ours" else b["tokens"].size for b in bs]
    flops = sum(common.step_flops(cfg, *b["tokens"].shape, n, r=LORA_R)
                for b, n in zip(bs, logit_rows))
    seconds = statistics.median(res["seconds"])
    rows.append({"side": side, "mode": mode, "dtype": dtype, "steps": len(bs), "real": real,
                 "tok_s": real / seconds, "step_s": seconds / len(bs),
                 "rss_gb": res["rss_gb"], "tflop": flops / len(bs) / 1e12,
                 "peak_share": flops / seconds / peaks[dtype],
                 "compile_s": res["warmup"]["compile_s"], "losses": res["warmup"]["losses"]})
  return rows


def tables(rows: list[dict], peaks: dict) -> str:
  best_torch = max((r["tok_s"] for r in rows if r["side"] != "ours"), default=float("nan"))
  lines = ["| side | batches | params | steps/pass | real tokens/s (median) | vs best torch "
           "| s/step | peak RSS GB | TFLOP/step | % of matmul peak | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    name = "ours (JAX)" if r["side"] == "ours" else "transformers+PEFT, " + "{} attention{}".format(
        *TORCH_SETTINGS[r["side"]][:1], ", torch.compile" if TORCH_SETTINGS[r["side"]][1] else "")
    compile_s = f"{r['compile_s']:.1f}" if r["side"] in ("ours", "torch-compile") else "-"
    lines.append(f"| {name} | {r['mode']} | {r['dtype']} | {r['steps']} | {r['tok_s']:.0f} "
                 f"| {r['tok_s'] / best_torch:.2f}x | {r['step_s']:.2f} | {r['rss_gb']:.2f} "
                 f"| {r['tflop']:.3f} | {100 * r['peak_share']:.0f}% | {compile_s} |")
  best_ours = max(r["tok_s"] for r in rows if r["side"] == "ours")
  lines.append(f"\nBest ours / best torch: **{best_ours / best_torch:.2f}x** real tokens/s. "
               "Matmul peak (jnp.dot 2048 x 2048, float32 accumulation) of the row's dtype: " +
               ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()) + ". Our "
               "bfloat16 rows run model.matmul=bfloat16 (bfloat16 matmul inputs, float32 "
               "accumulation, residual stream and elementwise math) with remat; torch's run "
               "the model in bfloat16.")
  return "\n".join(lines + [""] + loss_table(rows))


def loss_table(rows: list[dict]) -> list[str]:
  """Per-step losses of the warm-up pass (same initial adapter, same pad batches).

  The last column holds each setting's distance from the float32 reference (torch float32).
  """
  by = {(r["side"], r["mode"], r["dtype"]): r["losses"] for r in rows}
  f32 = by.get(("torch", "pad", "float32"))
  lines = ["| params | step | loss ours (pad) | loss torch | abs diff | ours - torch float32 |",
           "|---|---|---|---|---|---|"]
  for dtype in ("float32", "bfloat16"):
    ours, theirs = by.get(("ours", "pad", dtype)), by.get(("torch", "pad", dtype))
    if not ours or not theirs:
      continue
    ref = f32 or [float("nan")] * len(ours)
    for i, (a, b, r) in enumerate(zip(ours, theirs, ref)):
      lines.append(f"| {dtype} | {i} | {a:.6f} | {b:.6f} | {abs(a - b):.2e} | {abs(a - r):.2e} |")
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    worst_ref = max(abs(a - r) for a, r in zip(ours, ref))
    verdict = ("within 1e-3" if worst <= 1e-3 else "ABOVE 1e-3") if dtype == "float32" else ""
    lines.append(f"| {dtype} | max | | | **{worst:.2e}** {verdict} | {worst_ref:.2e} |")
  return lines


def record(text: str, args):
  common.record(common.section(
      "train_step.py: Gemma 3 270M, ours vs transformers + PEFT",
      f"{ROWS} rows x up to {MAX_LEN} tokens, first {ROWS * args.batches} records of "
      f"{common.ALPACA}, LoRA r={LORA_R} alpha={LORA_ALPHA:g} on q_proj, v_proj, AdamW lr "
      f"{LR:g} wd {WEIGHT_DECAY:g}, {args.rounds} rounds", text))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", default=str(common.SHARED_DATA),
                  help=f"folder holding {common.ALPACA} (default $JAX_IT_SHARED_DATA, else "
                  "shared/data beside the checkout)")
  ap.add_argument("--batches", type=int, default=3, help="pad batches per pass (4 records each)")
  ap.add_argument("--rounds", type=int, default=2, help="timed passes per side after warm-up")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--no-torch", action="store_true", help="our side only")
  ap.add_argument("--torch", default="torch,torch-sdpa,torch-compile",
                  help=f"torch settings to run, of {', '.join(TORCH_SETTINGS)}")
  ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
  args = ap.parse_args()
  common.alpaca_file(args.data)  # before minutes of model loading

  start = time.perf_counter()
  gguf = common.gemma3_gguf()
  peaks = {d: common.matmul_peak(d) for d in args.dtypes.split(",")}
  print(f"{common.machine()}; matmul peaks " +
        ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()), flush=True)
  with tempfile.TemporaryDirectory() as workdir:
    inputs = make_inputs(args, workdir, gguf)
    spec = {"workdir": workdir, "gguf": gguf}
    results = {}
    for dtype in args.dtypes.split(","):
      results.update(run_phase(dtype, args, spec))
  text = tables(summarize(results, inputs["batches"], inputs["cfg"], peaks), peaks)
  print(text)
  print(f"total {time.perf_counter() - start:.0f} s")
  if not args.no_record:
    record(text, args)


if __name__ == "__main__":
  main()
