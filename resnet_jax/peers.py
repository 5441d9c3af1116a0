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
errors`). jaxlib's hook for that report cannot be called from Python (its status does not
convert: `std::bad_cast`), so that abort stays.
"""

import os
import sys
import threading

from etils import epath

_workdir: epath.Path | None = None
_ending = threading.Lock()


def watch(workdir: epath.Path) -> None:
    """The workdir whose checkpoints `latest_checkpoint` names."""
    global _workdir
    _workdir = workdir


def collective_failed(error: BaseException) -> str:
    """What a failed operation across the processes says."""
    return (f"an operation across the processes failed ({' '.join(str(error).split())[:300]}): "
            f"another process of this run has died or cannot be reached; its log says why")


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
