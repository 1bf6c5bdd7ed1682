"""The stacked in-memory destination every reader streams into, and per-projection layouts.

transformers and llama.cpp store each projection as an [out, in] matrix; model.py keeps one
layer's weight in the einsum layout of families.PROJECTIONS (q: [N, D, H], o: [N, H, D], ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jax_it import model
from jax_it.ckpt import CheckpointError
from jax_it.families import Projection
from jax_it.model import ModelConfig, Params

CHUNK_BYTES = 1 << 26  # big tensors are copied in row chunks of about 64 MiB


def _aligned_empty(shape, dtype) -> np.ndarray:
  """Uninitialised array on a 64-byte boundary, so jax.device_put can alias it, not copy it."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  buf = np.empty(nbytes + 64, np.uint8)
  start = -buf.ctypes.data % 64
  return buf[start:start + nbytes].view(dtype).reshape(shape)


class Stacker:
  """Preallocated stacked params, filled one source tensor (or row chunk) at a time."""

  def __init__(self, cfg: ModelConfig, dtype, source: Path):
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg, dtype))
    self.flat = {k: _aligned_empty(s.shape, dtype)
                 for k, s in traverse_util.flatten_dict(shapes, sep="/").items()}
    self.written = dict.fromkeys(self.flat, 0)
    self.source = source

  def put(self, key: str, index: tuple, value: np.ndarray, name: str, rows: int | None = None):
    """Write `value` at flat[key][index] (or at rows `rows:` of it when copying in chunks)."""
    if key not in self.flat:
      raise CheckpointError(f"{self.source}: tensor {name} has no place in this model ({key})")
    dst = self.flat[key][index]
    if rows is not None:
      dst = dst[rows:rows + value.shape[0]]
    if dst.shape != value.shape:
      raise CheckpointError(f"{self.source}: tensor {name} has shape {tuple(value.shape)}, "
                            f"expected {dst.shape} for {key}")
    dst[...] = value
    self.written[key] += value.size

  def put_layer(self, what: Projection | str, layer: int, value: np.ndarray, name: str,
                sizes: dict[str, int], norm_offset: float = 0.0):
    """One layer's tensor: a projection's [out, in] matrix, or a norm's scale (less norm_offset)."""
    if isinstance(what, Projection):
      index = (layer,) if what.part is None else (layer, what.part)
      self.put(weight_key(what), index, from_matrix(value, what, sizes), name)
    else:
      self.put(f"layers/{what}/scale", (layer,), value - norm_offset if norm_offset else value,
               name)

  def finish(self) -> Params:
    missing = [k for k, a in self.flat.items() if self.written[k] < a.size]
    if missing:
      raise CheckpointError(f"{self.source}: missing tensors for {', '.join(missing)}")
    flat = {k: jax.device_put(self.flat.pop(k), may_alias=True) for k in list(self.flat)}
    return traverse_util.unflatten_dict(flat, sep="/")


def copy_rows(stack: Stacker, key: str, name: str, shape,
              read_rows: Callable[[int, int], np.ndarray], fix=None):
  """Copy a 2-D tensor in row chunks; `read_rows(a, b)` returns rows a:b as floats."""
  step = max(1, CHUNK_BYTES // (4 * int(np.prod(shape[1:]))))
  for a in range(0, shape[0], step):
    rows = read_rows(a, min(a + step, shape[0]))
    stack.put(key, (), rows if fix is None else fix(rows), name, rows=a)


def weight_key(p: Projection) -> str:
  """The stacked weight holding projection p: [L, (part,) *p.weight_axes]."""
  return f"layers/{p.block}/{p.param}/w"


def _split(n: int, letters: str, sizes: dict[str, int]) -> tuple[int, ...]:
  """Sizes of the axes `letters` flattened into n entries: the first gets what the rest leave."""
  rest = tuple(sizes[a] for a in letters[1:])
  return (n // max(1, math.prod(rest)),) + rest


def from_matrix(w: np.ndarray, p: Projection, sizes: dict[str, int]) -> np.ndarray:
  """[out, in] matrix (out = p.out_axes, in = p.in_axes flattened) -> p.weight_axes layout."""
  if w.ndim != 2:
    return w  # of the wrong rank: Stacker.put reports its shape
  order = p.out_axes + p.in_axes
  w = w.reshape(_split(w.shape[0], p.out_axes, sizes) + _split(w.shape[1], p.in_axes, sizes))
  return w.transpose([order.index(a) for a in p.weight_axes])


def to_matrix(w: np.ndarray, p: Projection) -> np.ndarray:
  """One layer's weight in p.weight_axes layout -> the [out, in] matrix."""
  order = p.out_axes + p.in_axes
  w = w.transpose([p.weight_axes.index(a) for a in order])
  return w.reshape(math.prod(w.shape[:len(p.out_axes)]), -1)
