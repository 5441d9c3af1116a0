"""One run per workdir: process 0 holds WORKDIR/lock.json for the whole run.

Two runs on one workdir (a relaunch while the old job still runs, a copied command) would both
write its checkpoints and metrics.jsonl. The lock is created atomically (`paths.create_new`:
O_EXCL on a local disk, a create-only put in a bucket) and names its holder's host, pid and
start time. A thread refreshes its time every `REFRESH_SECONDS` (file writes only, no JAX
operation). A second run refuses in one line naming the holder. A lock is taken over, said in
the log, only on evidence that its holder is gone: not refreshed for `STALE_SECONDS` (an
unreadable lock: its file not written for as long), or of this host and its process no longer
exists. An unreadable lock written recently may have a live holder: refused.
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

from resnet_jax.run import validate
from resnet_jax.run import paths

NAME = "lock.json"
REFRESH_SECONDS = 60.0
STALE_SECONDS = 600.0


class WorkdirLocked(validate.SetupError):
    """Another run may hold the workdir, or its lock cannot be created; nothing has been written."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# What a lock holds: anything else is unreadable (cut short by a full disk, overwritten).
_FIELDS = {"host": str, "pid": int, "started": (int, float), "refreshed": (int, float), "token": str}


def _holder(path: epath.Path) -> dict | None:
    """The lock's holder, or None where the lock is gone or unreadable."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(holder, dict) and all(isinstance(holder.get(k), t) for k, t in _FIELDS.items())
    return holder if ok else None


def _judge(path: epath.Path, holder: dict | None, stale_seconds: float) -> tuple[str, str]:
    """(why the holder is gone, "") where the lock may be taken over, ("", why not) where its
    holder may run, ("", "") where it was removed meanwhile.
    Taken over only on evidence: no refresh for `stale_seconds`, or a dead process of this host."""
    if holder is None:
        return _judge_unreadable(path, stale_seconds)
    age = time.time() - holder["refreshed"]
    if age > stale_seconds:
        return f"it was not refreshed for {age:.0f} s", ""
    if holder["host"] == socket.gethostname() and not _alive(holder["pid"]):
        return f"its process {holder['pid']} no longer exists", ""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["started"]))
    return "", (f"another run holds the workdir: host {holder['host']}, pid {holder['pid']}, "
                f"started {started} ({path}); stop it or use another --workdir")


def _judge_unreadable(path: epath.Path, stale_seconds: float) -> tuple[str, str]:
    """`_judge` for a lock whose holder cannot be read, by the file's modification time: a live
    holder rewrites it every refresh. (epath gives whole seconds: os.stat locally, the object's
    update time in a bucket; 0 where a store keeps none.)"""
    try:
        modified = path.stat().mtime
    except FileNotFoundError:  # removed meanwhile: nothing to take over, created again
        return "", ""
    except OSError:
        modified = 0
    remove = "remove it if sure that no run holds the workdir"
    if not modified:
        return "", f"the lock {path} is unreadable and its age unknown: {remove}"
    age = time.time() - modified
    if age > stale_seconds:
        return f"it is unreadable and was not written for {age:.0f} s", ""
    return "", (f"the lock {path} is unreadable but was written {age:.0f} s ago, so a run may hold "
                f"it: wait {stale_seconds:.0f} s (it is then taken over), or {remove}")


def _create(path: epath.Path, text: str) -> bool:
    """`paths.create_new`; where it fails (a full disk), what it wrote of `text` is removed,
    lest it keep the next run out: no other run writes this run's text."""
    try:
        return paths.create_new(path, text)
    except OSError:
        with contextlib.suppress(OSError):
            if text.startswith(path.read_text()):
                path.unlink()
        raise


def _take(path: epath.Path, mine: dict, stale_seconds: float) -> str:
    """Takes the lock; returns "" once held, else the one-line reason it is not."""
    try:
        for _ in range(3):  # another run may take over a gone holder's lock at the same moment
            if _create(path, json.dumps(mine)):
                return ""
            holder = _holder(path)
            gone, refusal = _judge(path, holder, stale_seconds)
            if refusal:
                return refusal
            if gone:
                logging.warning("Taking over %s%s: %s.", path, f" from host {holder['host']}, pid "
                                f"{holder['pid']}" if holder else "", gone)
                path.unlink(missing_ok=True)
    except OSError as error:  # a full disk, no permission
        return f"could not create the lock {path}: {validate.one_line(error)}"
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
                paths.write_text(path, json.dumps(mine))
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
