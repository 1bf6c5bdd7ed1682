"""orbax checkpoints of a run: LoRA, optimizer state, step, data-iterator state and run identity."""

from __future__ import annotations

import os
import shutil
import sys
import time

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """The run directory holds checkpoints of a different run."""


class Checkpointer:
  """A CheckpointManager over `<run_dir>/checkpoints`.

  orbax writes each step into a temporary folder and renames it only once every item is
  complete, so a process killed mid-save leaves nothing that `latest_step` would pick up.
  """

  def __init__(self, run_dir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, lora, opt_state, data_iter, identity: dict, force: bool = False):
    args = {"lora": ocp.args.StandardSave(lora), "opt_state": ocp.args.StandardSave(opt_state),
            "meta": ocp.args.JsonSave(dict(identity, step=step))}
    if data_iter is not None:
      # every process iterates the same global pipeline (data.train_dataset), so one state,
      # under one name, serves any number of processes: a run resumes on another process count
      args["data_state"] = ocp.args.JsonSave(data_iter.get_state())
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, lora, opt_state, data_iter, identity: dict):
    """The latest checkpoint that reads, into the structures of lora/opt_state (and the
    iterator, in place): (lora, opt_state, step). See `_first_readable`."""
    def read(step):
      args = {"lora": ocp.args.StandardRestore(_abstract(lora)),
              "opt_state": ocp.args.StandardRestore(_abstract(opt_state))}
      state_item = "data_state"
      if data_iter is not None:
        if os.path.isdir(os.path.join(self.directory, str(step), state_item)):
          args[state_item] = ocp.args.JsonRestore()
        else:  # a checkpoint written before data_state: grain's per-process files
          state_item = None
          args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
      if data_iter is not None and state_item:
        data_iter.set_state(out[state_item])
      return out["lora"], out["opt_state"]

    (lora, opt_state), step = self._first_readable(read, identity)
    return lora, opt_state, step

  def restore_lora(self, lora, identity: dict, hint: str | None = None):
    """Only the adapter of the latest checkpoint that reads (for eval, generate, export)."""
    def read(step):
      return self.manager.restore(step, args=ocp.args.Composite(
          lora=ocp.args.StandardRestore(_abstract(lora))))["lora"]

    return self._first_readable(read, identity, hint)

  def _first_readable(self, read, identity: dict, hint: str | None = None):
    """(read(step), step) for the newest step that reads.

    A step that fails to read (a truncated or damaged file) is named, moved aside into
    `<run_dir>/corrupt_checkpoints/` (kept, not deleted) and the step before it is tried; only
    when no step reads is it an error. A checkpoint of another run is an error at once.
    """
    moved = 0
    while True:
      step = self.latest_step()
      if step is None:
        why = (f"none of its {moved} checkpoint(s) could be read (moved to corrupt_checkpoints/)"
               if moved else "no complete checkpoint to load")
        raise CheckpointMismatch(f"{self.directory}: {why}")
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        check_identity(meta["meta"], identity, self.directory, hint)
        return read(step), step
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
        self._move_aside(step, e)
        moved += 1

  def _move_aside(self, step: int, error: Exception):
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints",
                         f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), aside)
      print(f"checkpoint step {step} in {self.directory} is unreadable ({first[:200]}); moved "
            f"to {aside}; trying the one before it", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def check_identity(saved: dict, current: dict, where: str, hint: str | None = None):
  """Refuse to resume a run whose model, adapter shape or data differ from the checkpoint's.

  Only keys both sides have are compared, one level into sections: an option added to the
  config after the checkpoint was written is no difference. The error names the first
  differing key (`data.template`) and both values.
  """
  hint = hint or "use another --run-dir or delete that folder"
  for k in current:
    if k not in saved:
      continue
    a, b = saved[k], current[k]
    if isinstance(a, dict) and isinstance(b, dict):
      for n in sorted(a.keys() & b.keys()):
        if a[n] != b[n]:
          raise CheckpointMismatch(
              f"{where} holds checkpoints of a different run ({k}.{n}: saved {a[n]!r}, this "
              f"run {b[n]!r}); {hint}")
    elif a != b:
      raise CheckpointMismatch(
          f"{where} holds checkpoints of a different run ({k}: saved {a!r}, this run "
          f"{b!r}); {hint}")
