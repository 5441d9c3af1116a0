"""One run per workdir: process 0 holds WORKDIR/lock.json for the whole run.

Two runs on one workdir (a relaunch while the old job still runs, a copied command) would both
write its checkpoints and metrics.jsonl. The lock is created atomically (`workdir.create_new`:
O_EXCL on a local disk, a create-only put in a bucket) and names its holder's host, pid and
start time. A thread refreshes its time every `REFRESH_SECONDS` (file writes only, no JAX
operation). A second run refuses in one line naming the holder. A lock whose holder is gone is
taken over, said in the log: one not refreshed for `STALE_SECONDS`, or one of this host whose
process no longer exists.
"""

import contextlib
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax import validate
from resnet_jax import workdir as workdirs

NAME = "lock.json"
REFRESH_SECONDS = 60.0
STALE_SECONDS = 600.0


class WorkdirLocked(validate.SetupError):
    """Another run holds the workdir; nothing has been written."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(path: epath.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # gone meanwhile, or cut short by a full disk
        return None


def _gone(holder: dict | None, stale_seconds: float) -> str:
    """Why the holder is gone, or "" if it may still run."""
    if holder is None:
        return "the lock is unreadable"
    age = time.time() - float(holder.get("refreshed", 0))
    if age > stale_seconds:
        return f"it was not refreshed for {age:.0f} s"
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
        return f"its process {holder.get('pid')} no longer exists"
    return ""


def _take(path: epath.Path, mine: dict, stale_seconds: float) -> str:
    """Takes the lock; returns "" once held, else the one-line reason it is not."""
    for _ in range(3):  # another run may take over a gone holder's lock at the same moment
        if workdirs.create_new(path, json.dumps(mine)):
            return ""
        holder = _holder(path)
        reason = _gone(holder, stale_seconds)
        if not reason:
            started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["started"]))
            return (f"another run holds the workdir: host {holder['host']}, pid {holder['pid']}, "
                    f"started {started} ({path}); stop it or use another --workdir")
        logging.warning("Taking over %s from host %s, pid %s: %s.", path,
                        (holder or {}).get("host"), (holder or {}).get("pid"), reason)
        path.unlink(missing_ok=True)
    return f"could not take {path}: other runs keep taking it"


@contextlib.contextmanager
def held(workdir: epath.Path, stale_seconds: float = STALE_SECONDS, refresh_seconds: float = REFRESH_SECONDS):
    """Holds `workdir`'s lock while the block runs; raises WorkdirLocked on every process if
    another run holds it. Every process calls this, process 0 takes the lock."""
    path = workdir / NAME
    now = time.time()
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "refreshed": now,
            "token": uuid.uuid4().hex}
    reason = _take(path, mine, stale_seconds) if jax.process_index() == 0 else ""
    if jax.process_count() > 1:  # every process stops, not process 0 alone
        refused = multihost_utils.broadcast_one_to_all(np.int32(bool(reason)))
        reason = reason or ("process 0 found the workdir held by another run" if refused else "")
    if reason:
        raise WorkdirLocked(reason)
    stop = threading.Event()

    def refresh():
        while not stop.wait(refresh_seconds):
            mine["refreshed"] = time.time()
            try:
                workdirs.write_text(path, json.dumps(mine))
            except OSError as error:  # a full disk: the run goes on, the lock may look stale
                logging.warning("Could not refresh %s: %s", path, error)

    refresher = threading.Thread(target=refresh, name="workdir-lock", daemon=True)
    if jax.process_index() == 0:
        refresher.start()
    try:
        yield
    finally:
        stop.set()
        if jax.process_index() == 0:
            refresher.join()
            if (_holder(path) or {}).get("token") == mine["token"]:
                path.unlink(missing_ok=True)
