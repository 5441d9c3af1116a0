"""The parent of each process of a multi-process run: it runs the same command as its child and
ends as the child ended, saying in one line what the child could not say.

Why a parent (torchrun's agent is one too): where process 0, which hosts JAX's coordination
service, dies, JAX's client aborts every other process from its own thread (SIGABRT) within a
second, and no code of the run runs after that; a process killed (kill -9, the kernel's
out-of-memory killer) or crashed says nothing at all. The parent sees how its child ended, says
it in one line, its last, with the latest complete checkpoint, and exits with status 1. Where
its child died of a signal that is not JAX's abort, it leaves a note in the workdir by which the
other processes name the one that died (`peers.py`).

The child runs in a session of its own, so that a Ctrl-C at a terminal reaches it once, through
the parent, which passes SIGINT, SIGTERM and SIGUSR1 (the stacks into the log file: `console`)
on; it dies with the parent (a kill -9 of the process a launcher started still ends the run's
process).
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from resnet_jax.distributed import clusters

_INFO = "RESNET_JAX_SUPERVISED"  # in the child's environment: the file it names itself in
_PR_SET_PDEATHSIG = 1  # prctl(2)


def needed(argv: list[str]) -> bool:
    """Whether this command is a process of a multi-process launch not yet under its parent."""
    if _INFO in os.environ:
        return False
    return (any(arg.startswith("--coordinator_address") for arg in argv)
            or clusters.detect_cluster() is not None)


def tell(process_index: int, process_count: int) -> None:
    """The child names itself to its parent (nothing where there is none)."""
    path = os.environ.get(_INFO)
    if path:
        with open(path, "w") as f:  # a local temporary file of the parent's, not the workdir
            json.dump({"process": process_index, "processes": process_count}, f)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def run(argv: list[str]) -> None:
    """Runs this command (as Python was started: `sys.orig_argv`) as the child, and exits as
    above. Never returns."""
    started = time.time()
    handle, info = tempfile.mkstemp(prefix="resnet_jax_process_", suffix=".json")
    os.close(handle)
    child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env={**os.environ, _INFO: info},
                             start_new_session=True, preexec_fn=_die_with_parent)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda signum, frame: child.send_signal(signum))
    status = child.wait()
    if status >= 0:
        os.remove(info)
        sys.exit(status)
    try:
        with open(info) as f:
            named = json.load(f)
    except (OSError, ValueError):  # it ended before it joined the run
        named = None
    os.remove(info)
    print(f"resnet_jax: error: {_ended(-status, named, _flag(argv, 'workdir'), started)}", file=sys.stderr,
          flush=True)
    sys.exit(1)


def _ended(signum: int, named: dict | None, workdir: str | None, started: float) -> str:
    """The line for a child started at `started` that died of `signum`; leaves the note for the
    other processes."""
    from resnet_jax.distributed import peers
    from resnet_jax.run import paths

    name = signal.Signals(signum).name
    if workdir:
        try:
            peers.watch(paths.resolve(workdir), since=started)
        except paths.WorkdirError:
            pass
    who = f"process {named['process']} of {named['processes']}" if named else "this process"
    several = named is not None and named["processes"] > 1
    if signum == signal.SIGABRT and several:
        # JAX's client aborts where the coordination service reports a dead process or cannot
        # be reached (process 0 died); an abort of XLA's own reads the same.
        ended = peers.ended_processes()
        return (f"JAX ended {who} (SIGABRT): {ended or peers.UNNAMED}; "
                f"{peers.latest_checkpoint()}")
    what = ("was killed (SIGKILL: by a person, or by the kernel short of memory)"
            if signum == signal.SIGKILL else f"crashed ({name}; the crash dump is in its log file)")
    if several:
        peers.note_ended(named["process"], f"{who} {what}")
    return f"{who} {what}; {peers.latest_checkpoint()}"
