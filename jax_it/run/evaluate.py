"""Base-vs-tuned evaluation: greedy responses, exact match, stops (EOS or the chat format's turn
terminator), response loss, loss plot."""

from __future__ import annotations

import json
import os
import time

import jax

from jax_it import data, ifeval, sample, scoring, templates, train
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
  its last model turn), `batch` rows decoding at a time; (text, ended with a stop token)."""
  g, template = ctx.cfg.generate, data.template_of(ctx.cfg.data)
  prompts = [templates.format_prompt(r, template)[0] for r in records]
  stops = templates.stop_ids(template, ctx.tokenizer)
  # all prompts in one call: a row that stops frees its slot for the next prompt
  return sample.generate_text(ctx.params, ctx.mcfg, ctx.tokenizer, prompts, lora=adapter,
                              max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                              top_k=g.top_k, top_p=g.top_p, seed=g.seed, eos_id=stops,
                              batch=batch)


def _row(record: dict) -> dict:
  """A record as eval.json shows it: an instruction record's fields, or a conversation's turns
  before its last model turn and that turn as `output`."""
  if "messages" not in record:
    return {"instruction": record["instruction"], "input": record["input"],
            "output": record["output"]}
  before, reply = templates.split_last_reply(record)
  return {"messages": before, "output": reply}


def _references(records: list[dict]) -> list[str]:
  return [templates.split_last_reply(r)[1] for r in records]


def compare(ctx: Context, adapter, records: list[dict], n_generate: int) -> dict:
  """Metrics of base (no adapter) and tuned model on held-out records, and the responses:
  response loss and the text metrics of scoring.text_metrics (ROUGE-L and lengths against the
  references where every record has one); on the generated sets the three answer readings,
  regressions and per-family figures; on IFEval-style records (with `constraints`) strict and
  loose instruction following."""
  gen = records[:n_generate]
  refs = _references(gen)
  has_refs = bool(gen) and all(refs) and all(_references(records))
  result = {"records": len(records), "generated": len(gen), "rows": []}
  if not has_refs:
    result["skipped"] = ["response loss, reference lengths and ROUGE-L: not every record has a "
                         "reference output"]
  rows = [_row(r) for r in gen]
  template = data.template_of(ctx.cfg.data)
  result["stop_tokens"] = [ctx.tokenizer.convert_ids_to_tokens(i)
                           for i in templates.stop_ids(template, ctx.tokenizer)]
  result["max_new_tokens"] = ctx.cfg.generate.max_new_tokens
  texts = {}
  for name, a in (("base", None), ("tuned", adapter)):
    start = time.perf_counter()
    res = responses(ctx, gen, a) if gen else []
    # wall seconds of the whole generation (compiles included): what a user waits for
    result[f"generate_seconds_{name}"] = round(time.perf_counter() - start, 1)
    for row, (text, stopped) in zip(rows, res):
      row[f"response_{name}"] = text
      row[f"eos_{name}"] = stopped  # ended with a stop token (EOS or the turn terminator)
    texts[name] = [t for t, _ in res]
    result[f"loss_{name}"] = eval_loss(ctx, a, records) if has_refs else None
    result[f"eos_share_{name}"] = sum(st for _, st in res) / max(len(res), 1)
    result[f"text_{name}"] = scoring.text_metrics(refs if has_refs else None, texts[name],
                                                  [st for _, st in res])
  if gen and all("constraints" in r for r in gen):
    for name in texts:
      result[f"ifeval_{name}"] = ifeval.score(gen, texts[name])
  elif gen and has_refs and all("family" in r for r in gen):  # answers checkable exactly
    result["answers"] = scoring.answer_metrics(refs, texts["base"], texts["tuned"],
                                               groups=[r["family"] for r in gen])
    for name in texts:
      result[f"accuracy_{name}"] = result["answers"][f"strict_{name}"]
  result["rows"] = rows
  return result


def _pct(v) -> str:
  return "-" if v is None else f"{v:.1%}"


def table(result: dict) -> str:
  """The before/after tables (markdown): the headline, then answers per family, open-ended
  text, instruction following, as far as the result holds them."""
  lines = ["| metric | base | tuned |", "|---|---|---|"]
  stops = " or ".join(result.get("stop_tokens") or ["EOS"])
  ans = result.get("answers", {})
  for key, label, fmt in (
      ("strict", "exact match (strict)", _pct),
      ("first_line", "answer as the first line (case, spaces, punctuation ignored)", _pct),
      ("contains", "answer anywhere in the response (the base's best reading)", _pct)):
    if f"{key}_base" in ans:
      lines.append(f"| {label} | {fmt(ans[key + '_base'])} | {fmt(ans[key + '_tuned'])} |")
  rows = [("eos_share", f"responses ending with {stops}", _pct),
          ("loss", "response-token loss", lambda v: "-" if v is None else f"{v:.4f}"),
          ("generate_seconds", "generation wall time (compiles included)",
           lambda v: f"{v:.0f} s")]
  for key, label, fmt in rows:
    if f"{key}_base" in result:
      lines.append(f"| {label} | {fmt(result[key + '_base'])} | {fmt(result[key + '_tuned'])} |")
  if "regressions" in ans:
    lines.append(f"| regressions: base had the answer, tuned is wrong | | {ans['regressions']} "
                 f"of {ans['n']} |")
  out = ["\n".join(lines)]
  if ans.get("per_group"):
    fam = ["| family | n | strict base | contains base | strict tuned | regressions |",
           "|---|---|---|---|---|---|"]
    for g, m in ans["per_group"].items():
      fam.append(f"| {g} | {m['n']} | {_pct(m['strict_base'])} | {_pct(m['contains_base'])} | "
                 f"{_pct(m['strict_tuned'])} | {m['regressions']} |")
    out.append("\n".join(fam))
  if "text_base" in result:
    tb, tt = result["text_base"], result["text_tuned"]
    text = [f"| responses (limit {result.get('max_new_tokens')} new tokens) | base | tuned |",
            "|---|---|---|",
            f"| median length, characters (reference: "
            f"{tb.get('reference_median_chars', '-')}) | {tb['median_chars']} | "
            f"{tt['median_chars']} |",
            f"| within 3x the reference's length + 200 characters | "
            f"{_pct(tb.get('within_3x_reference'))} | {_pct(tt.get('within_3x_reference'))} |",
            f"| ending in a repetition loop | {_pct(tb['loops'])} | {_pct(tt['loops'])} |"]
    if "rouge_l" in tb:
      text.append(f"| ROUGE-L F1 against the reference | {tb['rouge_l']:.3f} | "
                  f"{tt['rouge_l']:.3f} |")
    out.append("\n".join(text))
  if "ifeval_base" in result:
    ib, it = result["ifeval_base"], result["ifeval_tuned"]
    ife = [f"| instruction following ({ib['n_prompts']} prompts) | base | tuned |",
           "|---|---|---|"]
    for key, label in (("prompt_strict", "prompts, strict"), ("prompt_loose", "prompts, loose"),
                       ("instruction_strict", "constraints, strict"),
                       ("instruction_loose", "constraints, loose")):
      ife.append(f"| {label} | {_pct(ib[key])} | {_pct(it[key])} |")
    for kind in sorted(ib["per_kind"]):
      b, t = ib["per_kind"][kind], it["per_kind"][kind]
      ife.append(f"| `{kind}` (n={b['n']}), loose | {_pct(b['loose'])} | {_pct(t['loose'])} |")
    out.append("\n".join(ife))
  if "judge" in result:
    out.append(judge_table(result["judge"]))
  out += [f"skipped: {why}" for why in result.get("skipped", [])]
  return "\n\n".join(out)


def judge_table(j: dict) -> str:
  """The judge's figures: mean scores, the pairwise tally and win rate, what went unjudged."""
  def score(s):
    ci = "" if s["ci95"] is None else f" ({s['ci95'][0]:.1f}-{s['ci95'][1]:.1f})"
    return "-" if s["mean"] is None else f"{s['mean']:.1f}{ci}, n={s['n']}"
  pw, sb, st = j["pairwise"], j["score_base"], j["score_tuned"]
  rate = "-" if pw["win_rate"] is None else (
      f"{pw['win_rate']:.1%} ({pw['ci95'][0]:.1%}-{pw['ci95'][1]:.1%})")
  lines = [f"| judge: {j['model']} at {j['url']} | base | tuned |", "|---|---|---|",
           f"| mean score 0-100 (95% interval) | {score(sb)} | {score(st)} |",
           f"| scores unjudged | {sb['unjudged']} | {st['unjudged']} |",
           f"| pairwise, both orders agreeing: wins / ties / losses of tuned | | {pw['wins']} / "
           f"{pw['ties']} / {pw['losses']} (orders disagreed: {pw['order_disagreements']}) |",
           f"| tuned win rate, a tie counting half (95% Wilson interval) | | {rate} |",
           f"| pairs unjudged | | {pw['unjudged']} of {j['records']} |"]
  notes = [f"judge: {j['unjudged']} of {j['judgements']} judgements unjudged"]
  notes += [f"  {n} x {why}" for why, n in j.get("unjudged_reasons", {}).items()]
  notes += [f"  gave up: {j['gave_up']}"] if j.get("gave_up") else []
  notes.append(f"judge prompts: {j['prompts']['score']['source']}, "
               f"{j['prompts']['pair']['source']}; parsing: {j['parsing']}")
  return "\n".join(lines) + "\n\n" + "\n".join(notes)


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
  prompts = "".join(  # the judge's prompts in full: its figures read against them
      f"\n## Judge prompt: {k} ({p['source']})\n\n```\n{p['text'].strip()}\n```\n"
      for k, p in result.get("judge", {}).get("prompts", {}).items())
  with open(os.path.join(run_dir, "report.md"), "w") as f:
    f.write(text + prompts)
  plot_losses(run_dir)
  plot_lengths(result, run_dir)
  return text


def plot_lengths(result: dict, run_dir: str) -> str | None:
  """lengths.png: the distribution of response lengths (characters) of base, tuned and the
  reference, so a model that never stops shows as a pile at the generation limit."""
  rows = result["rows"]
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series = {"base": [len(r["response_base"]) for r in rows],
            "tuned": [len(r["response_tuned"]) for r in rows]}
  if all(r["output"] for r in rows):
    series["reference"] = [len(r["output"]) for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  top = max(max(v) for v in series.values()) or 1
  bins = [top * i / 30 for i in range(31)]
  for name, lengths in series.items():
    ax.hist(lengths, bins=bins, histtype="step", linewidth=1.5, label=name)
  ax.set_xlabel(f"response length, characters (limit {result.get('max_new_tokens')} tokens)")
  ax.set_ylabel("responses")
  ax.legend()
  out = os.path.join(run_dir, "lengths.png")
  fig.savefig(out, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return out


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
