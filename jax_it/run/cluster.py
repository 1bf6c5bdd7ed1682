"""The processes of one multi-process run: joining it, agreeing at start, failing together.

Every process runs the same `run.py` command (one per host on a Cloud TPU pod, one per node or
GPU on a cluster). The environment describes the run:

  JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i   any cluster
  JAX_DISTRIBUTED=1                                jax detects it (Cloud TPU pods, SLURM)
  JAX_IT_JOIN_TIMEOUT=seconds                      how long to wait for all N (default 300)
  JAX_IT_HEARTBEAT_TIMEOUT=seconds                 how soon a vanished process (killed, its
                                                   host lost) ends the others (default 100)

A process that fails (bad data on its host, an exception) says so in the coordination service's
key-value store and exits. A watchdog thread in every other process sees it within a second,
prints it (process 0: the failing process's one-line error) and exits with the same status, so
no process sits in a collective or a shutdown barrier waiting for one that is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

_PREFIX = "jax_it"
_POLL_S = 0.5
_ACK_WAIT_S = 10.0  # process 0 hosts the coordination service: it leaves last, after the acks

_state = {"watchdog": None, "agreed": 0}
_at_abort: list[Callable[[], None]] = []


class ClusterError(RuntimeError):
  """The run's processes cannot work together; the message names the variable or key."""


def _client():
  """The coordination service client, or None outside a multi-process run."""
  from jax._src import distributed
  return distributed.global_state.client


def initialize() -> bool:
  """Join a multi-process run when the environment describes one; True when it did."""
  import jax
  env = os.environ
  timeout = _seconds("JAX_IT_JOIN_TIMEOUT", 300)
  heartbeat = _seconds("JAX_IT_HEARTBEAT_TIMEOUT", 100)
  if env.get("JAX_COORDINATOR_ADDRESS"):
    address = env["JAX_COORDINATOR_ADDRESS"]
    try:
      n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except (KeyError, ValueError):
      raise ClusterError("JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                         "must be set to integers too") from None
    if n < 1 or not 0 <= i < n:  # refused here, before any process waits for the others
      raise ClusterError(f"JAX_PROCESS_ID={i} with JAX_NUM_PROCESSES={n}: expected "
                         f"0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES")
    kwargs = dict(coordinator_address=address, num_processes=n, process_id=i)
    where = f"JAX_COORDINATOR_ADDRESS={address} (process {i} of {n})"
    # jax aborts the whole process (no exception) when the coordinator never answers: look first
    if i == 0:
      _check_port_free(address)
    else:
      _wait_for_coordinator(address, timeout, where)
  elif env.get("JAX_DISTRIBUTED") == "1":
    kwargs, where = {}, "the cluster jax detected (JAX_DISTRIBUTED=1)"
  else:
    return False
  try:
    jax.distributed.initialize(initialization_timeout=timeout,
                               heartbeat_timeout_seconds=heartbeat, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # jax raises runtime errors of its own
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise ClusterError(f"could not join the run at {where} within JAX_IT_JOIN_TIMEOUT={timeout} "
                       f"s: {first}") from None
  if jax.process_count() > 1:
    _start_watchdog()
  return True


def _host_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ClusterError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port")
  return host.strip("[]"), int(port)


def _check_port_free(address: str) -> None:
  """Process 0 serves the coordination service on the address's port: it must be free here."""
  _, port = _host_port(address)
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-ended run's port may wait
    try:
      s.bind(("", port))
    except OSError as e:
      raise ClusterError(f"JAX_COORDINATOR_ADDRESS={address}: process 0 serves the run on port "
                         f"{port}, which is in use here ({e.strerror})") from None


def _wait_for_coordinator(address: str, timeout: int, where: str) -> None:
  host, port = _host_port(address)
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host, port), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ClusterError(f"could not join the run at {where} within JAX_IT_JOIN_TIMEOUT="
                           f"{timeout} s: nothing answers there ({e.strerror or e}); start "
                           "process 0 first or check the address") from None
      time.sleep(0.5)


def _seconds(name: str, default: int) -> int:
  text = os.environ.get(name, str(default))
  if not text.isdigit() or int(text) < 1:
    raise ClusterError(f"{name}={text!r}: expected a whole number of seconds >= 1")
  return int(text)


def joined() -> bool:
  """Whether this process joined a multi-process run (jax.distributed is initialized)."""
  return _client() is not None


def process() -> tuple[int, int]:
  import jax
  return jax.process_index(), jax.process_count()


# ---------------------------------------------------------------------------------------------
# Agreeing at start


def _flat(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def agree(what: str, payload: dict | Callable[[], dict], timeout_s: int = 600) -> None:
  """Refuse to go on unless every process holds the same `payload` (a nested dict, e.g. the
  resolved config; or a function making it, called only in a multi-process run): a
  ClusterError naming the differing keys, raised on every process."""
  client = _client()
  if client is None:
    return
  i, n = process()
  if n == 1:
    return
  if callable(payload):
    payload = payload()
  _state["agreed"] += 1
  key = f"{_PREFIX}/agree/{_state['agreed']}/"
  mine = json.loads(json.dumps(payload, sort_keys=True, default=str))
  client.key_value_set(key + str(i), json.dumps(mine))
  mine = _flat(mine)
  for j in range(n):
    if j == i:
      continue
    theirs = _flat(json.loads(client.blocking_key_value_get(key + str(j), timeout_s * 1000)))
    keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if keys:
      shown = "; ".join(f"{k}: {mine.get(k)!r} here, {theirs.get(k)!r} on process {j}"
                        for k in keys[:5])
      more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
      raise ClusterError(f"the processes were started with different {what} ({shown}{more}); "
                         "start every process with the same command and files")


def sync(name: str, timeout_s: int = 3600) -> None:
  """Wait until every process gets here (a process that fails instead ends this one)."""
  client = _client()
  if client is not None and process()[1] > 1:
    client.wait_at_barrier(f"{_PREFIX}/{name}", timeout_s * 1000)


# ---------------------------------------------------------------------------------------------
# Failing together


def at_abort(fn: Callable[[], None]) -> Callable[[], None]:
  """Run `fn` if this process is stopped because another failed; returns an undo."""
  _at_abort.append(fn)
  return lambda: fn in _at_abort and _at_abort.remove(fn)


def fail(message: str, status: int) -> None:
  """Tell the other processes that this one failed with `message`, then exit with `status`
  without the shutdown barrier (they will not reach it). Outside a multi-process run: nothing."""
  client = _client()
  if client is None or process()[1] == 1:
    return
  i, n = process()
  try:
    client.key_value_set(f"{_PREFIX}/failed/{i}", json.dumps({"message": message,
                                                              "status": status}))
    if i == 0:  # the others need the coordination service to read it: wait for their acks
      _wait_for_acks(client, n)
  finally:
    _exit(status)


def _wait_for_acks(client, n: int) -> None:
  deadline = time.monotonic() + _ACK_WAIT_S
  while time.monotonic() < deadline:
    try:
      acked = {k for k, _ in client.key_value_dir_get(f"{_PREFIX}/ack/")}
      failed = {k for k, _ in client.key_value_dir_get(f"{_PREFIX}/failed/")}
    except Exception:  # pylint: disable=broad-except  # the service is going away
      return
    if len(acked) + len(failed) >= n:
      return
    time.sleep(_POLL_S / 5)


def _exit(status: int) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access  # no atexit: no shutdown barrier


def _start_watchdog() -> None:
  if _state["watchdog"] is None:
    t = threading.Thread(target=_watch, name="jax_it-watchdog", daemon=True)
    t.start()
    _state["watchdog"] = t


def _watch() -> None:
  client = _client()
  i, n = process()
  errors = 0
  while True:
    time.sleep(_POLL_S)
    try:
      failed = client.key_value_dir_get(f"{_PREFIX}/failed/")
      errors = 0
    except Exception:  # pylint: disable=broad-except  # a transient error, or the service gone
      errors += 1
      if errors == 20:  # 10 s: the coordinator is gone, and jax's heartbeats report that
        return
      continue
    others = sorted((int(k.rsplit("/", 1)[1]), json.loads(v)) for k, v in failed)
    others = [(j, f) for j, f in others if j != i]
    if not others:
      continue
    j, f = others[0]
    if i == 0:
      print(f"process {j} of {n} failed: {f['message']}", file=sys.stderr)
    else:
      print(f"stopping: process {j} of {n} failed", file=sys.stderr)
    for fn in list(_at_abort):
      try:
        fn()
      except Exception:  # pylint: disable=broad-except  # best effort on the way out
        pass
    try:
      client.key_value_set(f"{_PREFIX}/ack/{i}", "1")
      if i == 0:
        _wait_for_acks(client, n)
    finally:
      _exit(f["status"])
