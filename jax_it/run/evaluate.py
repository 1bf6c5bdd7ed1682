"""Base-vs-tuned evaluation: greedy responses, exact match, stops (EOS or the chat format's turn
terminator), response loss, loss plot."""

from __future__ import annotations

import json
import os

import jax

from jax_it import data, sample, synth, synth_chat, templates, train
from jax_it.run import metrics
from jax_it.run.setup import Context


def eval_loss(ctx: Context, adapter, records, max_batches: int = 0) -> float:
  """Mean response-token (loss-mask) NLL over records, in pad mode, no shuffle."""
  if not records:
    return float("nan")
  fn = _eval_fn(ctx.mcfg, ctx.cfg.train)
  nll, count = 0.0, 0.0
  # each process's share of a global batch of about train.batch_size rows (rounded up to whole
  # rows per device), whatever the number of processes and devices
  per_device = -(-ctx.cfg.train.batch_size // jax.device_count())
  batches = data.eval_batches(records, ctx.tokenizer, ctx.cfg.data,
                              per_device * len(ctx.mesh.local_devices))
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    a, b = fn(adapter, ctx.params, train.prepare_batch(batch, ctx.mesh))
    nll, count = nll + float(a), count + float(b)
  return nll / max(count, 1.0)


_EVAL_FNS = {}


def _eval_fn(mcfg, tcfg):
  key = (mcfg, tcfg)
  if key not in _EVAL_FNS:
    _EVAL_FNS[key] = jax.jit(lambda a, p, b: train.loss_sum(a, p, b, mcfg, tcfg))
  return _EVAL_FNS[key]


def responses(ctx: Context, records: list[dict], adapter,
              batch: int = 16) -> list[tuple[str, bool]]:
  """Greedy (or configured) responses to each record's prompt (a conversation's turns before
  its last model turn), in batches; (text, ended with a stop token) each."""
  g, template = ctx.cfg.generate, data.template_of(ctx.cfg.data)
  prompts = [templates.format_prompt(r, template)[0] for r in records]
  stops = templates.stop_ids(template, ctx.tokenizer)
  out = []
  for i in range(0, len(prompts), batch):
    out += sample.generate_text(ctx.params, ctx.mcfg, ctx.tokenizer, prompts[i:i + batch],
                                lora=adapter, max_new_tokens=g.max_new_tokens,
                                temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                seed=g.seed, eos_id=stops)
  return out


def _row(record: dict) -> dict:
  """A record as eval.json shows it: an instruction record's fields, or a conversation's turns
  before its last model turn and that turn as `output`."""
  if "messages" not in record:
    return {"instruction": record["instruction"], "input": record["input"],
            "output": record["output"]}
  before, reply = templates.split_last_reply(record)
  return {"messages": before, "output": reply}


def _accuracy(records: list[dict], texts: list[str]) -> float | None:
  """Exact-match accuracy where the records' answers are checkable (the generated sets)."""
  if not records or not all("family" in r for r in records):
    return None
  convs = [templates.is_conversation(r) for r in records]
  if all(convs):
    return synth_chat.accuracy(records, texts)
  return synth.accuracy(records, texts) if not any(convs) else None


def compare(ctx: Context, adapter, records: list[dict], n_generate: int) -> dict:
  """Metrics of base (no adapter) and tuned model on held-out records, and the responses."""
  gen = records[:n_generate]
  result = {"records": len(records), "generated": len(gen), "rows": []}
  rows = [_row(r) for r in gen]
  template = data.template_of(ctx.cfg.data)
  result["stop_tokens"] = [ctx.tokenizer.convert_ids_to_tokens(i)
                           for i in templates.stop_ids(template, ctx.tokenizer)]
  for name, a in (("base", None), ("tuned", adapter)):
    res = responses(ctx, gen, a) if gen else []
    for row, (text, stopped) in zip(rows, res):
      row[f"response_{name}"] = text
      row[f"eos_{name}"] = stopped  # ended with a stop token (EOS or the turn terminator)
    result[f"loss_{name}"] = eval_loss(ctx, a, records)
    result[f"eos_share_{name}"] = sum(st for _, st in res) / max(len(res), 1)
    acc = _accuracy(gen, [t for t, _ in res])
    if acc is not None:
      result[f"accuracy_{name}"] = acc
  result["rows"] = rows
  return result


def table(result: dict) -> str:
  """A small before/after table (markdown)."""
  lines = ["| metric | base | tuned |", "|---|---|---|"]
  stops = " or ".join(result.get("stop_tokens") or ["EOS"])
  for key, label, fmt in (("accuracy", "exact-match accuracy", "{:.1%}"),
                          ("eos_share", f"responses ending with {stops}", "{:.1%}"),
                          ("loss", "response-token loss", "{:.4f}")):
    if f"{key}_base" in result:
      lines.append(f"| {label} | {fmt.format(result[key + '_base'])} | "
                   f"{fmt.format(result[key + '_tuned'])} |")
  return "\n".join(lines)


def samples(result: dict, show: int) -> str:
  out = []
  for row in result["rows"][:show]:
    if "messages" in row:
      prompt = "\n  ".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    else:
      prompt = row["instruction"] + (f"\n  input: {row['input']}" if row["input"] else "")
    out.append(f"### {prompt}\n  expected: {row['output']!r}\n"
               f"  base:     {row['response_base']!r}\n  tuned:    {row['response_tuned']!r}")
  return "\n".join(out)


def write(result: dict, run_dir: str, show: int) -> str:
  """eval.json (rows like the reference run's output file), report.md; returns the report text."""
  with open(os.path.join(run_dir, "eval.json"), "w") as f:
    json.dump(result["rows"], f, indent=1)
  summary = {k: v for k, v in result.items() if k != "rows"}
  with open(os.path.join(run_dir, "eval_metrics.json"), "w") as f:  # strict JSON: NaN as null
    json.dump(json.loads(metrics.strict_json(summary)), f, indent=1)
  text = (f"Held-out records: {result['records']} (loss), {result['generated']} generated\n\n"
          f"{table(result)}\n\n{samples(result, show)}\n")
  with open(os.path.join(run_dir, "report.md"), "w") as f:
    f.write(text)
  plot_losses(run_dir)
  return text


def plot_losses(run_dir: str) -> str | None:
  """loss.png: training loss per step and validation loss where it was measured."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(path) as f:
    records = [json.loads(line) for line in f]
  train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
  val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train loss")
  if val:
    ax.plot(*zip(*val), "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per loss token)")
  ax.legend()
  out = os.path.join(run_dir, "loss.png")
  fig.savefig(out, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return out
