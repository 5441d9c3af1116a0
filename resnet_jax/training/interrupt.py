"""Ctrl-C in the commands: one line on stderr and exit status 130 (128 + SIGINT, as shells report
it), at once, wherever it lands: an import, a read, a compile, a garbage collection. A
KeyboardInterrupt instead would end in a traceback, or be swallowed where Python reports it as
unraisable (in a gc callback). The training loop installs its own handler (save, then 130) and
gives this one back when it ends. Imports nothing heavy: the commands install it first.
"""

import contextlib
import os
import signal
import sys

STATUS = 130
_line = b"resnet_jax: stopped by Ctrl-C\n"
_held: list[int] | None = None  # while a file is written: the Ctrl-Cs held back till it is whole
# The terminal's stderr as the command started: where the line goes even while fd 2 is taken
# (console.import_tensorflow sends it to a file while TensorFlow loads).
_terminal: int | None = None
_pending = False  # a Ctrl-C in a `raising` block, not yet raised


def _stop(signum, frame):
    if _held is not None:
        _held.append(signum)
        return
    try:
        sys.stdout.flush()  # what was printed before
    except Exception:  # noqa: BLE001  (reentrant: the signal landed inside a print)
        pass
    os.write(2 if _terminal is None else _terminal, _line)
    os._exit(STATUS)


def install(command: str) -> None:
    """Ctrl-C stops `command` ('resnet_jax', 'resnet_jax.report') as above; not where it is
    ignored (a command started in the background)."""
    global _line, _terminal
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _line = f"{command}: stopped by Ctrl-C\n".encode()
        if _terminal is None:
            _terminal = os.dup(2)
        signal.signal(signal.SIGINT, _stop)


def done() -> None:
    """The work is done: what is left is output written whole and the exit's clean-up, which a
    Ctrl-C would only cut short."""
    if signal.getsignal(signal.SIGINT) is _stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _note(signum, frame):
    global _pending
    if _pending:  # a second Ctrl-C: at once
        _stop(signum, frame)
    _pending = True


@contextlib.contextmanager
def raising():
    """While the block runs, Ctrl-C is raised as KeyboardInterrupt where `install` handles it,
    at the next `check` or the block's end, so that the block's clean-up (a lock released, a log
    kept) runs and the caller says the one line; a second Ctrl-C exits at once. Raised where it
    landed, it could be swallowed (a gc callback) or crash a C extension (TensorFlow's)."""
    mine = signal.getsignal(signal.SIGINT) is _stop
    if mine:
        signal.signal(signal.SIGINT, _note)
    try:
        yield
    finally:
        if mine:
            signal.signal(signal.SIGINT, _stop)
    check()


def check() -> None:
    """Raises KeyboardInterrupt where a Ctrl-C came in a `raising` block: called at points
    where stopping is safe, and before another handler takes Ctrl-C over."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def held():
    """Ctrl-C held back while a file is written, so that none is left half written. Where
    `install` handles Ctrl-C; elsewhere it changes nothing."""
    global _held
    _held = []
    try:
        yield
    finally:
        waiting, _held = _held, None
        if waiting:
            _stop(waiting[0], None)
