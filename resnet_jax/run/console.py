"""What the main job shows a person, and what it keeps in WORKDIR/log.txt.

At absl's default verbosity the terminal gets this project's own lines (what runs, the log
windows with their metrics and progress, evals, checkpoints, the result) and errors from anywhere,
each as "HH:MM:SS message". Everything else (orbax's save steps, absl, XLA, TensorFlow) goes to
the log file only, and to the terminal too with --verbosity=1 or more. The log file has every
record of every level that the verbosity lets through, with absl's full prefix: WORKDIR/log.txt
for process 0, WORKDIR/log.process-N.txt for process N (appended to on a resume). Lines before
the run holds its workdir wait in memory, so that bad input writes nothing. A workdir in a bucket
gets the file when the run ends (copied from a local file; a killed run's stays local).

The terminal shows a library's record as its first line, never its traceback (orbax logs a failed
save with several): the log file has them. A log file that cannot be written (a full disk) stops
being written at its first failure, without a word from Python's logging; `failure()` says so,
and the training loop stops the run with it in one line.

A run that hangs (a collective that a peer never joins) says where: `kill -USR1 PID` writes every
Python thread's stack to its log file and the run goes on.
"""

import contextlib
import faulthandler
import importlib.abc
import logging as pylogging
import os
import shutil
import signal
import sys
import tempfile

from absl import logging
from etils import epath

_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # resnet_jax/


# extra= for a record that goes to the log file alone (the traceback behind a one-line error).
LOG_FILE_ONLY = {"log_file_only": True}


def _ours(record: pylogging.LogRecord) -> bool:
    return record.pathname.startswith(_PROJECT)


class _Terminal(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        if getattr(record, "log_file_only", False):
            return False
        if _ended and not _ours(record):  # late records (asyncio's "Future exception was never
            return False                  # retrieved" of a failed save) follow no last line
        return (logging.get_verbosity() > logging.INFO or record.levelno >= pylogging.ERROR
                or _ours(record))


class _Short(pylogging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: pylogging.LogRecord) -> str:
        if _ours(record) or logging.get_verbosity() > logging.INFO:
            text = super().format(record)
        else:  # a library's error: its first line; its traceback is for the log file
            first = next(iter(record.getMessage().strip().splitlines()), "")
            text = f"{self.formatTime(record, self.datefmt)} {first}"
        if record.levelno >= pylogging.WARNING:  # "12:00:00 warning: ..."
            stamp, _, message = text.partition(" ")
            text = f"{stamp} {record.levelname.lower()}: {message}"
        return text


_crash_fd: int | None = None  # where Python's crash dumps go: the log file's own descriptor


class _WithoutKeras(importlib.abc.MetaPathFinder):
    """Refuses Keras's code while TensorFlow loads. TensorFlow imports Keras's optimizers as it
    loads, to register them for SavedModel, which this project never writes, and goes on where
    that import fails; Keras stays importable once TensorFlow has loaded (`tf.keras` included).
    It is a third of TensorFlow's import time (benchmarks/README.md), paid by every command."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] in (["keras", "src"], ["tf_keras", "src"]):
            raise ImportError(f"{name}: not loaded with TensorFlow (console.import_tensorflow)")
        return None


def import_tensorflow() -> None:
    """Imports TensorFlow, where it is installed, without Keras (`_WithoutKeras`), with what its
    native libraries write to the terminal as they load (oneDNN's and the CPU features' notices,
    after absl's "All log messages before absl::InitializeLog() ...", twice; TF_CPP_MIN_LOG_LEVEL
    does not reach them) sent to the log at debug level. The commands call it before anything
    imports TensorFlow: their data, and etils.epath, which uses TensorFlow's file systems where it
    is installed."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    without_keras = _WithoutKeras()
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        sys.meta_path.insert(0, without_keras)
        try:
            import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel
            failed = None
        except BaseException as error:  # noqa: BLE001  (raised below, after fd 2 is back)
            failed = error
        finally:
            sys.meta_path.remove(without_keras)
        os.dup2(terminal, 2)
        os.close(terminal)
        captured.seek(0)
        text = captured.read().decode(errors="replace").rstrip()
    if isinstance(failed, ModuleNotFoundError) and failed.name == "tensorflow":
        return  # not installed: the data on the devices needs none
    if failed is not None:
        if isinstance(failed, Exception) and text:  # what it wrote says why
            print(text, file=sys.stderr)
        raise failed
    if text:
        logging.debug("TensorFlow's native libraries wrote as they loaded:\n%s", text)


def _crash_dumps_to(file) -> None:
    """Python's crash dump (absl turns it on: every thread's stack, the modules) is a library's
    traceback: into the log `file` (through a descriptor of its own, kept open to the end, so
    that a crash after the run's last line still goes there), else (None) to stderr."""
    global _crash_fd
    if not faulthandler.is_enabled():
        return
    try:
        fd = None if file is None else os.dup(file.fileno())
        faulthandler.enable(sys.__stderr__ if fd is None else fd, all_threads=True)
        faulthandler.register(signal.SIGUSR1, sys.__stderr__ if fd is None else fd,
                              all_threads=True)
    except Exception:  # noqa: BLE001  (a stream with no descriptor: a test's)
        return
    if _crash_fd is not None:
        os.close(_crash_fd)
    _crash_fd = fd


class _LogFile(pylogging.Handler):
    """Every record, formatted as absl formats it; held in memory until `keep_in` names the
    file, then written to it line by line."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.PythonFormatter())
        self.held: list[str] | None = []
        self.file = None
        self.path = self.local_path = self.destination = None
        self.failure: str | None = None

    def emit(self, record: pylogging.LogRecord) -> None:
        if self.failure is not None:  # the file stopped at its first failed write
            return
        line = self.format(record) + "\n"
        if self.file is None:
            self.held.append(line)
            return
        try:
            self.file.write(line)
            self.file.flush()
        except Exception as error:  # a full disk: raised here, it would end whatever logged
            self._stop(error)

    def _stop(self, error: Exception) -> None:
        """Records the failure and writes no more (the lines go on to the terminal)."""
        self.failure = (f"writing the log file {self.path} failed ({type(error).__name__}: "
                        f"{' '.join(str(error).split())})")
        if self.file is not None:
            _crash_dumps_to(None)
            with contextlib.suppress(Exception):  # its buffered line fails again
                self.file.close()
        self.file, self.held = None, None

    def keep_in(self, path: epath.Path) -> None:
        if self.file is not None or self.failure is not None:
            return
        self.path = path
        if "://" in os.fspath(path):  # a bucket: no file to append to line by line
            self.local_path = os.path.join(tempfile.mkdtemp(prefix="resnet_jax_log_"), path.name)
            self.destination = path
        else:
            self.local_path = os.fspath(path)
        try:
            self.file = open(self.local_path, "a")  # noqa: SIM115  (open for the whole run)
            self.file.writelines(self.held)
            self.file.flush()
            _crash_dumps_to(self.file)
        except Exception as error:
            self._stop(error)
        self.held = None

    def close(self) -> None:
        if self.file is not None:
            if self.destination is not None:  # its local file is removed below
                _crash_dumps_to(None)
            try:
                self.file.close()
                if self.destination is not None:
                    with open(self.local_path) as f:
                        self.destination.write_text(f.read())
            except Exception as error:
                self._stop(error)
            self.file = None
        if self.destination is not None:
            shutil.rmtree(os.path.dirname(self.local_path), ignore_errors=True)
        super().close()


_log_file: _LogFile | None = None
_ended = False  # `close` was called: the run has ended


def setup() -> None:
    """The terminal's filter and format, and the log file's handler (call once, in the main job,
    after flags are parsed); TensorFlow imported (`import_tensorflow`)."""
    global _log_file, _ended
    _ended = False
    terminal = logging.get_absl_handler()
    terminal.addFilter(_Terminal())
    terminal.setFormatter(_Short())
    _log_file = _LogFile()
    pylogging.getLogger().addHandler(_log_file)
    import_tensorflow()


def keep_log(workdir: epath.Path, process_index: int) -> None:
    """From now on the log file is in `workdir` (the run holds it). Nothing without `setup`."""
    if _log_file is not None:
        _log_file.keep_in(workdir / ("log.txt" if process_index == 0 else
                                     f"log.process-{process_index}.txt"))


def failure() -> str | None:
    """Why the log file stopped being written ('writing the log file PATH failed (...)'), or None
    while it is written (or there is none). The run stops on it: `loop._write`."""
    return _log_file.failure if _log_file is not None else None


def close() -> str | None:
    """The log file complete (copied to a bucket workdir); later runs in this process keep none.
    From now on the terminal shows this project's lines only (the caller's last line comes next).
    Returns `failure()`: a failed last write or copy included."""
    global _log_file, _ended
    _ended = True
    if _log_file is None:
        return None
    pylogging.getLogger().removeHandler(_log_file)
    _log_file.close()
    failed, _log_file = _log_file.failure, None
    return failed
