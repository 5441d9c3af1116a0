"""How a survivor of a multi-process run ends when another process died.

A collective with a process that died fails on the survivors' main thread (on the CPU, Gloo's
"Connection reset by peer") as a `jax.errors.JaxRuntimeError`: `collective_failed` says so in a
line, and the survivor exits at once (`end`), past JAX's shutdown barrier: the dead process never
joins it, and JAX's coordination service would end the wait by aborting the survivor (SIGABRT, a
crash dump) after its heartbeat timeout. Every other ending goes through that barrier: all
processes reach it (they stop at the same step or agree on the error), and process 0, which
hosts the service, must not leave before the others, whom its exit would abort.

Where process 0 is the one that died, JAX's client aborts the survivors from its own thread
within a second (`Terminating process because the JAX distributed service detected fatal
errors`); jaxlib's hook for that report cannot be called from Python (its status does not
convert: `std::bad_cast`). The parent of each process says that line (`supervisor.py`).

Which process died: the parent of a process that died of a signal (kill -9, a crash) writes
WORKDIR/ended.process-N.json (`note_ended`), which the others read (`ended_processes`). A process
whose host is gone leaves none, and is not named.
"""

import json
import os
import sys
import threading
import time

from etils import epath

UNNAMED = ("another process of this run has died or cannot be reached (process 0 hosts JAX's "
           "coordination service); their logs say which")
_NOTE = "ended.process-{}.json"
_NOTE_WAIT = 10.0  # seconds for the note of a process that just died, written by its parent
_workdir: epath.Path | None = None
_since = 0.0  # notes older than this run's start are another run's
_ending = threading.Lock()


def watch(workdir: epath.Path, since: float | None = None) -> None:
    """The workdir whose checkpoints `latest_checkpoint` names and whose notes `ended_processes`
    reads: those written since `since` (a time.time(); default now, the run's start)."""
    global _workdir, _since
    _workdir, _since = workdir, time.time() if since is None else since


def note_ended(process: int, line: str) -> None:
    """Leaves `line` (what became of `process`) for the other processes; best effort: the run
    has already failed."""
    from resnet_jax.run import paths
    if _workdir is not None:
        try:
            paths.write_text(_workdir / _NOTE.format(process),
                             json.dumps({"line": line, "time": time.time()}))
        except Exception:  # noqa: BLE001  (a full disk, a gone bucket: the line says enough)
            pass


def ended_processes(wait: float = _NOTE_WAIT) -> str:
    """What the notes of this run's processes that died say ('process 1 of 2 was killed ...'),
    read for up to `wait` seconds until there is one; "" where none came."""
    deadline = time.monotonic() + wait
    while _workdir is not None:
        lines = []
        try:
            for path in sorted(_workdir.glob(_NOTE.format("*"))):
                note = json.loads(path.read_text())
                if note["time"] >= _since:
                    lines.append(note["line"])
        except Exception:  # noqa: BLE001  (a note half-written, a workdir that fails: none yet)
            lines = []
        if lines or time.monotonic() > deadline:
            return "; ".join(lines)
        time.sleep(0.2)
    return ""


def collective_failed(error: BaseException) -> str:
    """What a failed operation across the processes says."""
    return (f"an operation across the processes failed ({' '.join(str(error).split())[:300]}): "
            f"{ended_processes() or UNNAMED}")


def latest_checkpoint() -> str:
    """'the latest complete checkpoint, of step S, is intact in DIR', from the step directories
    of the watched workdir that orbax has committed: files only, no JAX operation or barrier,
    which a dead process would never join."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  (imports jax)

    if _workdir is None:
        return "no checkpoint was written"
    directory = _workdir / "checkpoints"
    try:
        steps = [int(path.name) for path in directory.iterdir()
                 if path.name.isdigit() and not ocp.step.is_path_temporary(path)]
    except OSError:
        steps = []
    if not steps:
        return f"no checkpoint is complete in {directory}"
    return f"the latest complete checkpoint, of step {max(steps)}, is intact in {directory}"


def end(line: str, status: int) -> None:
    """`line` on stderr, its last, and the process exits with `status` at once, past JAX's
    shutdown barrier (once, whichever thread comes first)."""
    if not _ending.acquire(blocking=False):
        return
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(status)
