"""Batch assembly on grain: several examples packed per row, or one example per padded row.

An example is a dict of equal-length 1-D arrays: `tokens` (int32), `targets` (int32, the next
token of the same example), `loss_mask` (float32, 1 where the target is trained on) and
`record_ids` (int32, 1 + the index of the record it came from, at each of its positions). A batch
adds `positions` (restarting at 0 per example) and `segment_ids` (1, 2, 3... per example in a
row, 0 on padding). Every batch has exactly `batch_size` rows, so a jitted step never retraces
at the end of a split; missing rows are all padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

EXAMPLE_KEYS = ("tokens", "targets", "loss_mask", "record_ids")
BATCH_KEYS = ("tokens", "targets", "loss_mask", "record_ids", "positions", "segment_ids")
PAD_MULTIPLE = 64  # padded rows are rounded up to this many positions (fewer distinct shapes)
DTYPES = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
          "record_ids": np.int32, "positions": np.int32, "segment_ids": np.int32}


def empty_batch(batch_size: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """A batch of padding only: nothing in it reaches the loss."""
  batch = {k: np.zeros((batch_size, length), DTYPES[k]) for k in BATCH_KEYS}
  batch["tokens"][:] = pad_id
  return batch


def padded_length(longest: int, max_len: int) -> int:
  """Row length for a pad-mode batch: the longest example rounded up to PAD_MULTIPLE."""
  rounded = -(-max(longest, 1) // PAD_MULTIPLE) * PAD_MULTIPLE
  return min(rounded, max_len)


def pad_batch(examples: Sequence[dict], *, batch_size: int, max_len: int,
              pad_id: int) -> dict[str, np.ndarray]:
  """One example per row, padded to the batch's longest example (see `padded_length`)."""
  length = padded_length(max((len(e["tokens"]) for e in examples), default=1), max_len)
  batch = empty_batch(batch_size, length, pad_id)
  for row, ex in enumerate(examples):
    n = len(ex["tokens"])
    for k in EXAMPLE_KEYS:
      batch[k][row, :n] = ex[k]
    batch["positions"][row, :n] = np.arange(n)
    batch["segment_ids"][row, :n] = 1 if n else 0
  return batch


def stack_packed_rows(rows: Sequence[dict], *, batch_size: int,
                      pad_id: int) -> dict[str, np.ndarray]:
  """Stacks rows from grain's packers into a batch, renaming their segment/position keys."""
  length = len(rows[0]["tokens"])
  batch = empty_batch(batch_size, length, pad_id)
  for row, packed in enumerate(rows):
    for k in EXAMPLE_KEYS:
      batch[k][row] = packed[k]
    # grain packs every key alike; the token key's segment ids/positions stand for all
    batch["segment_ids"][row] = packed["tokens_segment_ids"]
    batch["positions"][row] = packed["tokens_positions"]
  return batch


def pack_and_batch(ds: grain.IterDataset, *, batch_size: int, max_len: int, pad_id: int,
                   num_bins: int, seed: int = 0, shuffle_bins: bool = True) -> grain.IterDataset:
  """Best-fit packs examples into rows of `max_len`, then groups rows into batches."""
  ds = grain.experimental.BestFitPackIterDataset(
      ds,
      length_struct={k: max_len for k in EXAMPLE_KEYS},
      num_packing_bins=num_bins,
      seed=seed,
      shuffle_bins=shuffle_bins,
      padding_struct={"tokens": pad_id, "targets": 0, "loss_mask": 0, "record_ids": 0},
  )
  return ds.batch(batch_size, batch_fn=lambda rows: stack_packed_rows(
      rows, batch_size=batch_size, pad_id=pad_id))


def pad_and_batch(ds: grain.IterDataset | grain.MapDataset, *, batch_size: int, max_len: int,
                  pad_id: int):
  """Groups examples into pad-mode batches (one example per row)."""
  return ds.batch(batch_size, batch_fn=lambda exs: pad_batch(
      exs, batch_size=batch_size, max_len=max_len, pad_id=pad_id))


def real_token_share(batches) -> float:
  """Fraction of all row positions that hold a real token (not padding) over `batches`."""
  real = total = 0
  for b in batches:
    real += int(np.count_nonzero(b["segment_ids"]))
    total += b["segment_ids"].size
  return real / max(total, 1)
