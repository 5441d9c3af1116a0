"""What the main job shows a person, and what it keeps in WORKDIR/log.txt.

At absl's default verbosity the terminal gets this project's own lines (what runs, the log
windows with their metrics, the ETA, evals, checkpoints, the result) and errors from anywhere,
each as "HH:MM:SS message". Everything else (orbax's save steps, absl, XLA, TensorFlow) goes to
the log file only, and to the terminal too with --verbosity=1 or more. The log file has every
record of every level that the verbosity lets through, with absl's full prefix: WORKDIR/log.txt
for process 0, WORKDIR/log.process-N.txt for process N (appended to on a resume). Lines before
the run holds its workdir wait in memory, so that bad input writes nothing. A workdir in a bucket
gets the file when the run ends (copied from a local file; a killed run's stays local).
"""

import logging as pylogging
import os
import shutil
import tempfile

from absl import logging
from etils import epath

_PROJECT = os.path.dirname(os.path.abspath(__file__)) + os.sep
# clu's writers and progress reports log the metrics and the ETA through absl.
_ALSO_SHOWN = (os.sep + os.path.join("clu", "metric_writers") + os.sep,
               os.sep + os.path.join("clu", "platform") + os.sep)


class _Terminal(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        return (logging.get_verbosity() > logging.INFO or record.levelno >= pylogging.ERROR
                or record.pathname.startswith(_PROJECT)
                or any(part in record.pathname for part in _ALSO_SHOWN))


class _Short(pylogging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: pylogging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= pylogging.WARNING:  # "12:00:00 warning: ..."
            stamp, _, message = text.partition(" ")
            text = f"{stamp} {record.levelname.lower()}: {message}"
        return text


class _LogFile(pylogging.Handler):
    """Every record, formatted as absl formats it; held in memory until `keep_in` names the
    file, then written to it line by line."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.PythonFormatter())
        self.held: list[str] | None = []
        self.file = None
        self.local_path = self.destination = None

    def emit(self, record: pylogging.LogRecord) -> None:
        line = self.format(record) + "\n"
        if self.file is None:
            self.held.append(line)
        else:
            self.file.write(line)
            self.file.flush()

    def keep_in(self, path: epath.Path) -> None:
        if self.file is not None:
            return
        if "://" in os.fspath(path):  # a bucket: no file to append to line by line
            self.local_path = os.path.join(tempfile.mkdtemp(prefix="resnet_jax_log_"), path.name)
            self.destination = path
        else:
            self.local_path = os.fspath(path)
        self.file = open(self.local_path, "a")  # noqa: SIM115  (open for the whole run)
        self.file.writelines(self.held)
        self.file.flush()
        self.held = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            if self.destination is not None:
                with open(self.local_path) as f:
                    self.destination.write_text(f.read())
                shutil.rmtree(os.path.dirname(self.local_path), ignore_errors=True)
            self.file = None
        super().close()


_log_file: _LogFile | None = None


def setup() -> None:
    """The terminal's filter and format, and the log file's handler (call once, in the main job,
    after flags are parsed)."""
    global _log_file
    terminal = logging.get_absl_handler()
    terminal.addFilter(_Terminal())
    terminal.setFormatter(_Short())
    _log_file = _LogFile()
    pylogging.getLogger().addHandler(_log_file)


def keep_log(workdir: epath.Path, process_index: int) -> None:
    """From now on the log file is in `workdir` (the run holds it). Nothing without `setup`."""
    if _log_file is not None:
        _log_file.keep_in(workdir / ("log.txt" if process_index == 0 else
                                     f"log.process-{process_index}.txt"))


def close() -> None:
    """The log file complete (copied to a bucket workdir); later runs in this process keep none."""
    global _log_file
    if _log_file is not None:
        pylogging.getLogger().removeHandler(_log_file)
        _log_file.close()
        _log_file = None
