"""Prompt formats: records rendered into text segments, tokenized with a loss mask.

Two kinds of template:
  Template      the Alpaca-style formats ("alpaca", "reference", a custom format string) that
                turn an instruction record into one prompt and one response;
  ChatTemplate  Gemma's turn format ("gemma"), for conversations and instruction records alike:
                <bos><start_of_turn>user\\n{system\\n\\n}{user}<end_of_turn>\\n
                <start_of_turn>model\\n{reply}<end_of_turn>\\n ...

A rendered record is a list of segments (text, turn): `turn` is the index of the model turn the
text belongs to, or -1 for context (prompts, turn headers, separators). `loss_on` picks what the
loss sees: "assistant" (every model turn, its terminator included; "response" is its old name),
"last" (the final model turn only) or "all" (every token). Segments are tokenized one by one
and concatenated; special-token markers in them ("<start_of_turn>") become their ids through the
tokenizer, so no id is written down here. For the Gemma format the ids equal transformers'
`apply_chat_template(..., tokenize=True)` with the template Gemma publishes (tests/test_chat.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_it.sources import DataError, is_conversation

LOSS_ON = ("assistant", "response", "last", "all")
NAMED_TEMPLATES = ("alpaca", "reference", "gemma")

_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                   "provides further context. Write a response that appropriately completes "
                   "the request.\n\n")
_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
             "appropriately completes the request.\n\n")
_REFERENCE = (_PREAMBLE + "### Instruction: \n{instruction}\n\n###Input: \n{input}"
              "\n\n### Response:\n")


@dataclasses.dataclass(frozen=True)
class Template:
  """A prompt format: `with_input` / `no_input` hold {instruction} and {input} placeholders."""

  with_input: str
  no_input: str
  add_eos: bool = True
  loss_on: str = "assistant"
  name: str = "custom"

  @property
  def stop_tokens(self) -> tuple[str, ...]:
    return ()  # the tokenizer's EOS only


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Gemma's chat format. A system turn is folded into the first user turn (its text, then a
  blank line), as Gemma's own template does; contents are trimmed; "assistant" is "model"."""

  name: str = "gemma"
  start: str = "<start_of_turn>"
  end: str = "<end_of_turn>"
  add_eos: bool = False  # a model turn ends with `end`, which is in the loss
  loss_on: str = "assistant"

  @property
  def stop_tokens(self) -> tuple[str, ...]:
    return (self.end,)

  def turns(self, messages: list[dict]) -> list[tuple[str, str]]:
    """(role as written, content) per turn, the system turn folded into the first user one."""
    prefix = ""
    if messages and messages[0]["role"] == "system":
      prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    out = []
    for i, m in enumerate(messages):
      role = "model" if m["role"] == "assistant" else m["role"]
      out.append((role, (prefix if i == 0 else "") + m["content"].strip()))
    return out

  def segments(self, messages: list[dict]) -> list[tuple[str, int]]:
    segs, k = [], 0
    for role, content in self.turns(messages):
      if role == "model":  # the header is context; the reply and its terminator are trained
        segs += [(f"{self.start}model\n", -1), (content + self.end, k), ("\n", -1)]
        k += 1
      else:
        segs.append((f"{self.start}{role}\n{content}{self.end}\n", -1))
    return segs

  def generation_prompt(self, messages: list[dict]) -> str:
    """The text after BOS that asks for the next model turn."""
    return "".join(t for t, _ in self.segments(messages)) + f"{self.start}model\n"


TEMPLATES: dict[str, Template | ChatTemplate] = {
    # Stanford Alpaca; the response follows "### Response:" directly
    "alpaca": Template(
        with_input=_PREAMBLE_INPUT
        + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        no_input=_PREAMBLE + "### Instruction:\n{instruction}\n\n### Response:", name="alpaca"),
    # the reference run, quirks kept: spaces before the newlines, "###Input", the input block
    # even when empty, no EOS (so it never learned to stop) and loss on every token
    "reference": Template(with_input=_REFERENCE, no_input=_REFERENCE, add_eos=False,
                          loss_on="all", name="reference"),
    "gemma": ChatTemplate(),
}

# The chat template published with Gemma 3 checkpoints (the `chat_template` of their
# tokenizer_config.json, e.g. google/gemma-3-270m-it; text parts only). The packaged GGUF
# carries none, so the parity test and exported tokenizers take this one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n")


def get_template(template: str | Template | ChatTemplate,
                 no_input: str | None = None) -> Template | ChatTemplate:
  """A named template ("alpaca", "reference", "gemma") or a custom one from format strings."""
  if isinstance(template, (Template, ChatTemplate)):
    return template
  if template in TEMPLATES and no_input is None:
    return TEMPLATES[template]
  if template == "gemma":
    raise DataError("data.template_no_input applies to Alpaca-style templates, not 'gemma'")
  for text in (template, no_input):
    if text is not None and "{instruction}" not in text:
      raise DataError(f"template {text!r}: expected one of {', '.join(NAMED_TEMPLATES)} or a "
                      "string with an {instruction} placeholder")
  with_input = TEMPLATES[template].with_input if template in TEMPLATES else template
  return Template(with_input=with_input, no_input=no_input or with_input)


def as_messages(record: dict) -> list[dict]:
  """A record's turns: a conversation's own, or an instruction record as one user turn (the
  input after a blank line) and one model turn."""
  if is_conversation(record):
    return record["messages"]
  user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
  return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def split_last_reply(record: dict) -> tuple[list[dict], str]:
  """(the turns before the last model turn, that turn's content): a prompt and its reference.
  A conversation that ends with a user turn is all prompt, with no reference ("")."""
  messages = as_messages(record)
  if messages[-1]["role"] == "user":
    return messages, ""
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  return messages[:last], messages[last]["content"]


def format_prompt(record: dict, template: str | Template | ChatTemplate) -> tuple[str, str]:
  """(prompt text after BOS, reference response) of a validated record: what generation feeds
  the model and what the record says it should answer."""
  tpl = get_template(template)
  if isinstance(tpl, ChatTemplate):
    before, reply = split_last_reply(record)
    return tpl.generation_prompt(before), reply
  if is_conversation(record):
    raise DataError(f"data.template={tpl.name}: renders instruction records, but this record "
                    "is a conversation; set data.template=gemma")
  text = tpl.with_input if record.get("input") else tpl.no_input
  # replace, not str.format: instructions and custom templates may hold other braces
  prompt = text.replace("{instruction}", record["instruction"])
  prompt = prompt.replace("{input}", record.get("input", ""))
  return prompt, record["output"]


def render(record: dict, template: str | Template | ChatTemplate) -> list[tuple[str, int]]:
  """The record as (text, turn) segments after BOS (see the module doc)."""
  tpl = get_template(template)
  if isinstance(tpl, ChatTemplate):
    return tpl.segments(as_messages(record))
  prompt, response = format_prompt(record, tpl)
  return [(prompt, -1), (response, 0)]


def stop_ids(template: str | Template | ChatTemplate, tokenizer) -> tuple[int, ...]:
  """The ids generation stops at: the tokenizer's EOS and the template's turn terminator."""
  tpl = get_template(template)
  ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
  for token in tpl.stop_tokens:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
      raise DataError(f"data.template={tpl.name}: the tokenizer has no {token} token; this "
                      "format needs a Gemma tokenizer")
    ids.append(int(tid))
  return tuple(dict.fromkeys(ids))


def differs_from_tokenizer(tokenizer) -> str | None:
  """Where the tokenizer's own chat template (an -it checkpoint's) renders a probe conversation
  otherwise than the `gemma` format, a one-line description; None when they agree or it has
  none. Training in one format and serving with another is how tuned models fail to stop."""
  if not getattr(tokenizer, "chat_template", None):
    return None
  probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
           {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
  ex = tokenize_segments(render({"messages": probe}, "gemma"), tokenizer, add_eos=False)
  ours = ex["tokens"].tolist() + ex["targets"][-1:].tolist()
  try:
    theirs = list(tokenizer.apply_chat_template(probe, tokenize=True)["input_ids"])
  except Exception as e:  # pylint: disable=broad-except  # jinja raises what the template says
    return f"the tokenizer's chat template cannot render a plain conversation: {e}"
  if ours == theirs:
    return None
  return (f"the tokenizer's own chat template renders {tokenizer.decode(theirs)!r}, the gemma "
          f"format {tokenizer.decode(ours)!r}")


def tokenize_segments(segments: list[tuple[str, int]], tokenizer, *, add_eos: bool = True,
                      loss_on: str = "assistant") -> dict[str, np.ndarray]:
  """BOS + segments (+ EOS after the last model turn) as tokens/targets/loss_mask, uncut."""
  if loss_on not in LOSS_ON:
    raise DataError(f"data.loss_on={loss_on!r}: expected one of {', '.join(LOSS_ON)}")
  ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  turn = [-1] * len(ids)
  for text, k in segments:
    piece = list(tokenizer.encode(text, add_special_tokens=False))
    ids += piece
    turn += [k] * len(piece)
  if add_eos:
    if tokenizer.eos_token_id is None:
      raise DataError("tokenizer has no eos_token_id; set add_eos=False or use another one")
    ids.append(tokenizer.eos_token_id)
    turn.append(max((k for _, k in segments), default=-1))
  turn = np.asarray(turn)
  if loss_on == "all":
    in_loss = np.ones(len(ids), np.float32)
  elif loss_on == "last":
    in_loss = ((turn >= 0) & (turn == turn.max())).astype(np.float32)
  else:
    in_loss = (turn >= 0).astype(np.float32)
  seq = np.asarray(ids, np.int32)
  # position t predicts token t + 1: the last token is never an input, BOS never a target
  return {"tokens": seq[:-1], "targets": seq[1:], "loss_mask": in_loss[1:]}


def tokenize_example(prompt: str, response: str, tokenizer, *, add_eos: bool = True,
                     loss_on: str = "assistant") -> dict[str, np.ndarray]:
  """BOS + prompt + response (+ EOS): prompt and response tokenized apart, so the loss starts
  exactly at the response and the prompt tokens match what generation feeds the model."""
  return tokenize_segments([(prompt, -1), (response, 0)], tokenizer, add_eos=add_eos,
                           loss_on=loss_on)
