"""One trainer per run directory: a lock file naming its holder, taken over when the holder died."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from jax_it.run.setup import RunError

LOCK_FILE = "train.lock"


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), None where unknown or dead.

  Stored with the pid, it tells a live holder from a new process that reused a dead one's pid.
  """
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]  # field 22 of the whole line
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  started = _start_time(pid)
  return started is None or holder.get("start_time") in (None, started)


class RunLock:
  """`<run_dir>/train.lock` while a `train` command runs; one writer per run directory.

  Only process 0 of a multi-process run takes it (the others share process 0's run). A lock of
  a process that is gone (same host, pid dead or reused) is taken over with a message; a live
  holder, or one on another host (whose liveness this host cannot see), is an error naming it.
  """

  def __init__(self, run_dir: str, enabled: bool = True):
    self.path = os.path.join(run_dir, LOCK_FILE)
    self.held = False
    if enabled:
      self._take()

  def _take(self):
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # a second try after removing a stale lock
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._clear_stale(me["host"])
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return
    raise RunError(f"could not take {self.path}: another process took it at the same time")

  def _clear_stale(self, host: str):
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except (OSError, ValueError):
      holder = {}  # torn (killed while writing it): nobody holds it
    who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
    if holder and holder.get("host") != host:
      raise RunError(f"{os.path.dirname(self.path)} is in use by {who}; wait for it, use another "
                     f"--run-dir, or delete {self.path} if that process is gone")
    if holder and _alive(holder):
      raise RunError(f"{os.path.dirname(self.path)} is in use by {who}; wait for it or use "
                     "another --run-dir")
    print(f"taking over the lock of {who}, which is no longer running", file=sys.stderr,
          flush=True)
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def release(self):
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False
