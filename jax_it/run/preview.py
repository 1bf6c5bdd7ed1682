"""`run.py data`: what training will see of a config's data, before paying for a run.

A few train records rendered token by token with the loss-carrying tokens marked (green on a
terminal, [[brackets]] otherwise), then the split's numbers: token-length percentiles, records
cut or dropped at max_len, loss-token share, packing efficiency. Needs the tokenizer only.
"""

from __future__ import annotations

import numpy as np

from jax_it import config, data, templates
from jax_it.run import setup

GREEN, RESET = "\x1b[32m", "\x1b[0m"


def marked(example: dict[str, np.ndarray], tokenizer, color: bool, max_len: int,
           truncate: str = "truncate") -> str:
  """The example's text with trained tokens marked and a note where max_len cuts it."""
  seq = [int(example["tokens"][0])] + example["targets"].tolist()
  trained = [False] + (example["loss_mask"] > 0).tolist()
  out, start = [], 0
  for i in range(1, len(seq) + 1):  # runs of tokens with the same mark, decoded together
    if i < len(seq) and trained[i] == trained[start] and i != max_len:
      continue
    text = tokenizer.decode(seq[start:i], skip_special_tokens=False)
    if trained[start]:
      text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
    out.append(text)
    if i == max_len and i < len(seq):
      fate = "training sees nothing after this" if truncate == "truncate" else "record dropped"
      out.append(f" <<< data.max_len={max_len}: {fate} >>> ")
    start = i
  return "".join(out)


def preview(cfg: config.RunConfig, show: int = 3, color: bool = False) -> str:
  d = cfg.data
  tokenizer = setup.load_tokenizer(cfg.model)
  stats = data.DataStats()
  train = data.load_splits(d, stats)["train"]
  if not train:
    raise data.DataError(f"{d.path}: the train split is empty (splits={d.splits})")
  add_eos, loss_on = data.loss_settings(d)
  template = data.template_of(d)
  convs = sum(map(templates.is_conversation, train))
  lines = [f"data: {d.path}: {len(train)} train records ({convs} conversations, "
           f"{len(train) - convs} instruction records); template {template.name}, loss on "
           f"{loss_on}{', EOS appended' if add_eos else ''}; "
           f"stop tokens for generation: {', '.join(_stops(template, tokenizer))}",
           "trained tokens are " + ("green" if color else "in [[double brackets]]"), ""]
  for i, segments in data.rendered(train[:show], d):  # a record it cannot render: named
    ex = templates.tokenize_segments(segments, tokenizer, add_eos=add_eos, loss_on=loss_on)
    n, n_loss = len(ex["tokens"]) + 1, int(ex["loss_mask"].sum())
    lines += [f"--- train record {i}: {n} tokens, {n_loss} in the loss",
              marked(ex, tokenizer, color, d.max_len, d.truncate), ""]
  summary = setup.summarize_train(cfg, tokenizer, train, stats)
  lines.append(setup.format_data_summary(summary))
  return "\n".join(lines)


def _stops(template, tokenizer) -> list[str]:
  return [tokenizer.convert_ids_to_tokens(i) for i in templates.stop_ids(template, tokenizer)]
