"""`run.py chat`: a conversation with a run's model in the terminal, tokens printed as they come.

The prompt is the run's own template (data.template): with `gemma` every turn so far is sent
again in Gemma's turn format and the reply stops at <end_of_turn> or EOS; with an Alpaca-style
template each line is a fresh instruction (that format has no turns to carry history in).
"""

from __future__ import annotations

import sys
from typing import TextIO

from jax_it import data, sample, templates
from jax_it.run.setup import Context

HELP = ("/reset clears the conversation, /base talks to the base model, /tuned to the tuned one, "
        "/help shows this; Ctrl-D leaves")


class _Printer:
  """Writes a reply's text as its tokens arrive, holding back a partial UTF-8 character."""

  def __init__(self, tokenizer, out: TextIO):
    self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""

  def add(self, token: int) -> None:
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if not text.endswith("\ufffd"):
      self.out.write(text[len(self.shown):])
      self.out.flush()
      self.shown = text


def reply(ctx: Context, adapter, messages: list[dict], out: TextIO) -> tuple[str, bool]:
  """Streams the model's next turn after `messages` to `out`; (its text, stopped)."""
  template = data.template_of(ctx.cfg.data)
  if isinstance(template, templates.ChatTemplate):
    prompt = template.generation_prompt(messages)
  else:
    prompt, _ = templates.format_prompt(
        {"instruction": messages[-1]["content"], "input": "", "output": ""}, template)
  g = ctx.cfg.generate
  stops = templates.stop_ids(template, ctx.tokenizer)
  spec = sample.SampleSpec(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                           top_k=g.top_k, top_p=g.top_p, seed=g.seed, stop_ids=stops,
                           pad_id=ctx.tokenizer.pad_token_id or 0)
  printer, stopped = _Printer(ctx.tokenizer, out), False
  for token in sample.stream(ctx.params, ctx.mcfg, sample.prompt_ids(ctx.tokenizer, prompt),
                             lora=adapter, spec=spec):
    if token in stops:
      stopped = True
      break
    printer.add(token)
  return ctx.tokenizer.decode(printer.ids, skip_special_tokens=True), stopped


def repl(ctx: Context, adapter, inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
         system: str | None = None) -> int:
  """Reads user turns from `inp` until end of input; replies stream to `out`."""
  template = data.template_of(ctx.cfg.data)
  multi_turn = isinstance(template, templates.ChatTemplate)
  start = [{"role": "system", "content": system}] if system else []
  messages, use_base = list(start), False
  out.write(f"chat with {ctx.cfg.model.path} + the run's LoRA (template {template.name}"
            f"{'' if multi_turn else ': each line is a new instruction, no history'}); "
            f"{HELP}\n")
  while True:
    out.write(f"\n{'base' if use_base else 'you'}> ")
    out.flush()
    line = inp.readline()
    if not line:  # Ctrl-D
      out.write("\n")
      return 0
    line = line.strip()
    if not line:
      continue
    if line in ("/reset", "/base", "/tuned", "/help"):
      if line == "/reset":
        messages = list(start)
      use_base = {"/base": True, "/tuned": False}.get(line, use_base)
      out.write({"/reset": "(conversation cleared)", "/help": HELP,
                 "/base": "(now the base model, no adapter)",
                 "/tuned": "(now the tuned model)"}[line] + "\n")
      continue
    messages.append({"role": "user", "content": line})
    out.write("model> ")
    try:
      text, stopped = reply(ctx, None if use_base else adapter, messages, out)
    except KeyboardInterrupt:
      out.write("\n(interrupted; that turn is dropped)\n")
      messages.pop()
      continue
    if not stopped:
      out.write(f"\n(no stop token within generate.max_new_tokens="
                f"{ctx.cfg.generate.max_new_tokens})")
    out.write("\n")
    messages.append({"role": "assistant", "content": text})
    if not multi_turn:
      messages = list(start)
