"""Training data: config, splits, tokenization with loss masks, grain pipelines.

Records (instruction records or conversations, jax_it/sources.py) come from JSON lists, JSONL or
parquet files (concatenated in order), a hub dataset or a generated set; each is rendered by a
template (jax_it/templates.py) into segments, tokenized as BOS + segments (+ EOS) and turned
into an example of `tokens` / `targets` (next token) / `loss_mask` (see jax_it/packing.py for
batches).

Resuming training exactly: the iterator from `make_train_iterator` is a `grain.DatasetIterator`,
so it goes into the run's orbax checkpoint next to the LoRA state:

  mngr.save(step, args=ocp.args.Composite(
      lora=ocp.args.StandardSave(lora), data=grain.checkpoint.CheckpointSave(it)))
  ...  # in the resumed process, build `it` with the same config and tokenizer, then
  mngr.restore(step, args=ocp.args.Composite(
      lora=ocp.args.StandardRestore(lora), data=grain.checkpoint.CheckpointRestore(it)))

(or json.dumps(it.get_state()) / it.set_state(json.loads(...)) by hand); the restored
iterator yields exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import ClassVar

import grain
import numpy as np

from jax_it import packing, schema, synth, templates

# re-exported: callers catch data.DataError and read data.DataStats from here
from jax_it.sources import (
  DEFAULT_FIELDS,
  FORMATS,
  RECORD_FIELDS,
  DataError,
  DataStats,
  read_records,
)
from jax_it.templates import (  # noqa: F401
  TEMPLATES,
  ChatTemplate,
  Template,
  format_prompt,
  get_template,
  tokenize_example,
)

SPLITS = ("train", "test", "validation")  # the order they are cut from the records


SYNTH = "synth"  # data.path naming jax_it/synth.py's generated task set
SYNTH_CHAT = "synth-chat"  # ... and jax_it/synth_chat.py's generated conversations
SYNTH_IFEVAL = "synth-ifeval"  # ... and jax_it/ifeval's prompts with verifiable constraints


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data` section: where records come from and how they become batches.

  `loss_on` and `add_eos` default (None) to the template's own choice: response tokens + EOS
  for `alpaca` and custom templates; every token and no EOS for `reference`; every model turn
  with its <end_of_turn> for `gemma`.
  """

  SECTION: ClassVar[str] = "data"
  # file(s) concatenated in order, a hub dataset name, or a generated set: "synth" (short
  # checkable instructions), "synth-chat" (conversations), "synth-ifeval" (verifiable constraints)
  path: str | tuple[str, ...] = schema.field(SYNTH)
  # records: "alpaca" (instruction/input/output), "messages" ([{role, content}]), "sharegpt"
  # (conversations of {from, value}); "auto" tells them apart by each file's first record
  format: str = schema.field("auto", choices=FORMATS)
  # record key holding each of instruction / input / output, for files that name them otherwise
  fields: dict[str, str] = schema.field(dict(DEFAULT_FIELDS))
  # "alpaca" (Stanford), "reference" (the reference run's format), "gemma" (Gemma's chat turns:
  # conversations, or instruction records as one exchange) or a custom format string with an
  # {instruction} placeholder (and optionally {input})
  template: str = schema.field("alpaca")
  template_no_input: str | None = schema.field(None)  # custom template for records without input
  # "assistant" (every model turn / the response; "response" is the same), "last" (the final
  # model turn only), "all" (every token)
  loss_on: str | None = schema.field(None, choices=templates.LOSS_ON + (None,))
  add_eos: bool | None = schema.field(None)
  max_len: int = schema.field(1024, check=(lambda v: v >= 2, ">= 2"))
  batch_mode: str = schema.field("pack", choices=("pack", "pad"))
  truncate: str = schema.field("truncate", choices=("truncate", "drop"))  # past max_len
  # fractions [train, test, validation] of the concatenated records, cut in that order
  splits: tuple[float, float, float] = schema.field((0.85, 0.10, 0.05))
  split_shuffle: bool = schema.field(False)  # False: cut in file order, as the reference run did
  seed: int = schema.field(0, check=schema.SEED)
  workers: int = schema.field(0, check=schema.NON_NEGATIVE)  # tokenization threads
  on_error: str = schema.field("raise", choices=("raise", "skip"))  # bad records (counted)
  # rows packed at once; more pack tighter (alpaca_en_demo, rows of 1024: 8 bins 93%, 32+ 97%)
  pack_bins: int = schema.field(64, check=schema.POSITIVE)
  # path "synth" only: records per split and the generator's seed
  synth_train: int = schema.field(2000, check=schema.POSITIVE)
  synth_eval: int = schema.field(200, check=schema.NON_NEGATIVE)
  synth_seed: int = schema.field(0, check=schema.SEED)

  def __post_init__(self):
    schema.validate(self)

  def check(self):
    if set(self.fields) != set(RECORD_FIELDS):
      raise schema.error("data", "fields", self.fields,
                         f"a mapping with exactly the keys {', '.join(RECORD_FIELDS)}")
    s = self.splits
    if min(s) < 0 or abs(sum(s) - 1) > 1e-6:
      raise schema.error("data", "splits", list(s),
                         "three fractions [train, test, validation] >= 0 that sum to 1")
    paths = [self.path] if isinstance(self.path, str) else self.path
    if not paths or not all(p.strip() for p in paths):
      raise schema.error("data", "path", self.path, "a non-empty path or list of paths")
    named = templates.NAMED_TEMPLATES
    for key in ("template", "template_no_input"):
      text = getattr(self, key)
      if text is not None and text not in named and "{instruction}" not in text:
        raise schema.error("data", key, text, f"one of {', '.join(named)} or a format "
                           "string with an {instruction} placeholder")
    if self.template == "gemma" and self.template_no_input is not None:
      raise schema.error("data", "template_no_input", self.template_no_input,
                         "null with template gemma (it applies to Alpaca-style templates)")
    if self.template == "gemma" and self.add_eos:
      raise schema.error("data", "add_eos", self.add_eos, "null or false with template gemma: "
                         "model turns end with <end_of_turn>, which is trained on")


def load_records(cfg: DataConfig, stats: DataStats | None = None,
                 require_output: bool = True) -> list[dict]:
  """The records of `cfg.path`; see sources.read_records."""
  return read_records(cfg.path, cfg.fields, cfg.on_error, stats, cfg.format, require_output)


# ---------------------------------------------------------------------------------------------
# Splits


def split_records(records: Sequence[dict], cfg: DataConfig) -> dict[str, list[dict]]:
  """Train/test/validation, cut in that order (the reference run's `int(n * fraction)` sizes)."""
  order = np.arange(len(records))
  if cfg.split_shuffle:
    order = np.random.default_rng(cfg.seed).permutation(len(records))
  n = len(records)
  n_train, n_test = int(n * cfg.splits[0]), int(n * cfg.splits[1])
  bounds = {"train": (0, n_train), "test": (n_train, n_train + n_test),
            "validation": (n_train + n_test, n)}
  return {name: [records[i] for i in order[a:b]] for name, (a, b) in bounds.items()}


def load_splits(cfg: DataConfig, stats: DataStats | None = None) -> dict[str, list[dict]]:
  """train / test / validation records; the synthetic set holds out phrasings for eval splits."""
  if cfg.path in (SYNTH, SYNTH_CHAT, SYNTH_IFEVAL):
    from jax_it import ifeval, synth_chat  # pylint: disable=g-import-not-at-top
    gen = {SYNTH: synth.generate, SYNTH_CHAT: synth_chat.generate,
           SYNTH_IFEVAL: ifeval.generate}[cfg.path]
    held_out = gen(2 * cfg.synth_eval, cfg.synth_seed, "eval")
    if stats is not None:
      stats.loaded += cfg.synth_train + len(held_out)
    return {"train": gen(cfg.synth_train, cfg.synth_seed, "train"),
            "test": held_out[cfg.synth_eval:], "validation": held_out[:cfg.synth_eval]}
  return split_records(load_records(cfg, stats), cfg)


# ---------------------------------------------------------------------------------------------
# Tokenization


def fit_to_length(example: dict[str, np.ndarray], max_len: int, truncate: str):
  """The example cut to max_len ("truncate"), or None ("drop") when it is longer."""
  if len(example["tokens"]) <= max_len:
    return example
  if truncate == "drop":
    return None
  return {k: v[:max_len] for k, v in example.items()}


def _pad_id(tokenizer) -> int:
  return 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)


class _Tokenize:
  """(record id, segments) -> example cut to max_len, or None when dropped."""

  def __init__(self, tokenizer, cfg: DataConfig, stats: DataStats):
    self.tokenizer, self.cfg, self.stats = tokenizer, cfg, stats
    self.add_eos, self.loss_on = loss_settings(cfg)

  def __call__(self, item: tuple[int, list]):
    rid, segments = item
    ex = templates.tokenize_segments(segments, self.tokenizer, add_eos=self.add_eos,
                                     loss_on=self.loss_on)
    self.stats.lengths[rid] = len(ex["tokens"]) + 1  # + the last token, never an input
    fitted = fit_to_length(ex, self.cfg.max_len, self.cfg.truncate)
    if fitted is None:
      self.stats.dropped.add(rid)
      return None
    if fitted is not ex:
      self.stats.truncated.add(rid)
    if not fitted["loss_mask"].any():  # e.g. a prompt longer than max_len: nothing to learn
      self.stats.no_loss.add(rid)
      return None
    return dict(fitted, record_ids=np.full(len(fitted["tokens"]), rid + 1, np.int32))


def template_of(cfg: DataConfig) -> Template | ChatTemplate:
  return get_template(cfg.template, cfg.template_no_input)


def loss_settings(cfg: DataConfig) -> tuple[bool, str]:
  """(add_eos, loss_on): the config's, else the template's own."""
  tpl = template_of(cfg)
  return (tpl.add_eos if cfg.add_eos is None else cfg.add_eos), (cfg.loss_on or tpl.loss_on)


def rendered(records: Sequence[dict], cfg: DataConfig) -> list[tuple[int, list]]:
  """(record id, rendered segments) per record; a conversation under an Alpaca-style template
  fails here, before any tokenizing, naming the record."""
  tpl = template_of(cfg)
  out = []
  for i, r in enumerate(records):
    try:
      out.append((i, templates.render(r, tpl)))
    except DataError as e:
      raise DataError(f"{cfg.path}: record {i}: {e}") from None
  return out


def _shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # only the defaults need it

    process_index, process_count = jax.process_index(), jax.process_count()
  return process_index, process_count


# ---------------------------------------------------------------------------------------------
# Pipelines


def train_dataset(records: Sequence[dict], tokenizer, cfg: DataConfig, batch_size: int, *,
                  num_epochs: int | None = None, shuffle: bool = True,
                  stats: DataStats | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """This process's rows of the global batches of `records`: shuffled per epoch, tokenized,
  packed or padded into batches of `batch_size` rows (global: all processes together).

  Every process builds the same global batches (same records, same seeds) and keeps its own
  contiguous slice of rows, the rows its devices hold in the mesh. So the batches, and the
  losses, are the same whether 1 process or N feed them, and each example is fed once per
  epoch by exactly one process. The price: every process tokenizes the whole split.
  num_epochs=None repeats forever (stop by step count; with packing or dropping the number of
  batches per epoch depends on the data).
  """
  stats = DataStats() if stats is None else stats
  pi, pc = _shard(process_index, process_count)
  if batch_size % pc:
    raise DataError(f"a global batch of {batch_size} rows does not split over {pc} processes")
  ds = grain.MapDataset.source(rendered(records, cfg))
  if shuffle:  # before repeat: every epoch gets its own permutation and epochs never mix
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(num_epochs).map(_Tokenize(tokenizer, cfg, stats))
  read = grain.ReadOptions(num_threads=cfg.workers, prefetch_buffer_size=max(16, 4 * cfg.workers))
  it = ds.to_iter_dataset(read)  # drops the Nones of dropped examples
  batches = _batched(it, tokenizer, cfg, batch_size, shuffle)
  rows = batch_size // pc
  return batches.map(_Rows(pi * rows, (pi + 1) * rows))


class _Rows:
  """A batch's rows [start, stop): one process's slice of the global batch, with two facts of
  the whole batch that every process then knows without a collective: `batch_loss_counts`
  (loss tokens per global row, [global rows]) and `batch_real_tokens` (a scalar)."""

  def __init__(self, start: int, stop: int):
    self.start, self.stop = start, stop

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: v[self.start:self.stop] for k, v in batch.items()}
    out["batch_loss_counts"] = (batch["loss_mask"] > 0).sum(axis=1).astype(np.int32)
    out["batch_real_tokens"] = np.asarray((batch["segment_ids"] > 0).sum(), np.int64)
    return out


def _batched(examples: grain.IterDataset, tokenizer, cfg: DataConfig, batch_size: int,
             shuffle: bool) -> grain.IterDataset:
  if cfg.batch_mode == "pad":
    return packing.pad_and_batch(examples, batch_size=batch_size, max_len=cfg.max_len,
                                 pad_id=_pad_id(tokenizer))
  return packing.pack_and_batch(examples, batch_size=batch_size, max_len=cfg.max_len,
                                pad_id=_pad_id(tokenizer), num_bins=max(cfg.pack_bins, batch_size),
                                seed=cfg.seed, shuffle_bins=shuffle)


def make_train_iterator(cfg: DataConfig, tokenizer, batch_size: int, *,
                        num_epochs: int | None = None, shuffle: bool = True,
                        stats: DataStats | None = None, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """An iterator over training batches; checkpoint it as the module docstring shows."""
  records = load_splits(cfg, stats)["train"]
  if not records:
    raise DataError(f"{cfg.path}: the train split is empty (splits={cfg.splits})")
  return iter(train_dataset(records, tokenizer, cfg, batch_size, num_epochs=num_epochs,
                            shuffle=shuffle, stats=stats, process_index=process_index,
                            process_count=process_count))


def summarize(records: Sequence[dict], tokenizer, cfg: DataConfig, batch_size: int,
              stats: DataStats | None = None) -> dict:
  """What training sees of `records`, measured on one unshuffled epoch as one process: examples
  kept and dropped (stats gets the ids), percentiles of the records' token lengths before any
  cut, tokens, loss tokens, rows, and the share of row positions that hold a real token (the
  packer or padder the run uses, on rows that hold any)."""
  stats = DataStats() if stats is None else stats
  tok = _Tokenize(tokenizer, cfg, stats)
  examples = [ex for ex in map(tok, rendered(records, cfg)) if ex is not None]
  batches = _batched(grain.MapDataset.source(examples).to_iter_dataset(), tokenizer, cfg,
                     batch_size, shuffle=False) if examples else []
  rows = real = positions = 0
  for b in batches:
    used = (b["segment_ids"] > 0).any(axis=1)  # the epoch's last batch is topped up with padding
    rows += int(used.sum())
    real += int((b["segment_ids"][used] > 0).sum())
    positions += int(b["segment_ids"][used].size)
  lengths = [stats.lengths[i] for i in range(len(records)) if i in stats.lengths]
  pct = np.percentile(lengths, [50, 90, 99, 100]).round().astype(int).tolist() if lengths else []
  return {"records": len(records), "examples": len(examples),
          "length_percentiles": dict(zip(("p50", "p90", "p99", "max"), pct)),
          "tokens": sum(len(ex["tokens"]) for ex in examples),
          "loss_tokens": int(sum(ex["loss_mask"].sum() for ex in examples)),
          "rows": rows, "row_fill": real / max(positions, 1)}


def eval_batches(records: Sequence[dict], tokenizer, cfg: DataConfig, batch_size: int, *,
                 stats: DataStats | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Pad-mode batches of `records` in order, no shuffle; the same count on every process.

  Examples dropped as too long become empty rows, so the count never varies with content.
  """
  stats = DataStats() if stats is None else stats
  pi, pc = _shard(process_index, process_count)
  texts = rendered(records, cfg)
  per_process = -(-len(texts) // pc)
  mine = texts[pi::pc]
  tok = _Tokenize(tokenizer, cfg, stats)
  empty = {k: np.zeros(0, packing.DTYPES[k]) for k in packing.EXAMPLE_KEYS}
  # () stands for "no record here": it pads this process's share up to the common count
  examples = grain.MapDataset.source(mine + [()] * (per_process - len(mine)))
  examples = examples.map(lambda t: (tok(t) if t else None) or empty)
  yield from packing.pad_and_batch(examples, batch_size=batch_size, max_len=cfg.max_len,
                                   pad_id=_pad_id(tokenizer))
