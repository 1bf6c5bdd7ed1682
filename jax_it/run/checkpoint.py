"""orbax checkpoints of a run: LoRA, optimizer state, step, data-iterator state and run identity."""

from __future__ import annotations

import os

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
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, lora, opt_state, data_iter, identity: dict, step: int | None = None):
    """Restore into the structures of lora/opt_state (and the iterator, in place)."""
    step = self.latest_step() if step is None else step
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    check_identity(meta, identity, self.directory)
    args = {"lora": ocp.args.StandardRestore(_abstract(lora)),
            "opt_state": ocp.args.StandardRestore(_abstract(opt_state))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["lora"], out["opt_state"], step

  def restore_lora(self, lora, identity: dict, step: int | None = None):
    """Only the adapter of a checkpoint (for eval, generate, export)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointMismatch(f"{self.directory}: no complete checkpoint to load")
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    check_identity(meta, identity, self.directory)
    out = self.manager.restore(step, args=ocp.args.Composite(
        lora=ocp.args.StandardRestore(_abstract(lora))))
    return out["lora"], step

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def check_identity(saved: dict, current: dict, where: str):
  """Refuse to resume a run whose model, adapter shape or data differ from the checkpoint's.

  Only keys both sides have are compared, one level into sections: an option added to the
  config after the checkpoint was written is no difference.
  """
  for k in current:
    if k not in saved:
      continue
    a, b = saved[k], current[k]
    if isinstance(a, dict) and isinstance(b, dict):
      a, b = ({n: d[n] for n in a.keys() & b.keys()} for d in (a, b))
    if a != b:
      raise CheckpointMismatch(
          f"{where} holds checkpoints of a different run ({k}: saved {a!r}, this run "
          f"{b!r}); use another --run-dir or delete that folder")
