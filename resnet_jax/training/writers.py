"""Where the metrics go: log lines on every process; on process 0 also WORKDIR/metrics.jsonl
(for scripts and `report`) and TensorBoard events.

One stack, with or without TensorFlow: TensorBoard's own event writer writes through
TensorFlow's file systems where TensorFlow is installed (local, gs://) and through TensorBoard's
fsspec layer where it is not (data.on_device=True needs no TensorFlow). Each writer has
clu's `write_scalars`, `flush` and `close`, all the loop calls.
"""

import json
import math
from typing import Any

import jax
from absl import logging
from etils import epath

from resnet_jax.run import paths, validate
from resnet_jax.run.jsonl import JSONL, read_rows


class WriterError(OSError):
    """A writer that could not start (a full disk), its message naming what it writes."""


class Writer:
    """Writes each row as it comes: nothing to flush or close."""

    def flush(self):
        pass

    def close(self):
        pass


class LogWriter(Writer):
    """Scalars as one log line a row: `[step] name=value, ...`."""

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        values = [f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())]
        logging.info("[%d] %s", step, ", ".join(values))


class JsonlWriter(Writer):
    """One JSON object a row, {"step": N, name: value, ...}, in WORKDIR/metrics.jsonl.

    Object stores cannot append, so the writer keeps the rows and writes the file whole each
    time (a few MB for a 600k-step run logged every 100 steps). Started at step `start`, it
    keeps the rows up to `start` and forgets those a stopped run wrote after its last
    checkpoint: this run writes them again.
    """

    def __init__(self, workdir: epath.Path, start: int = 0):
        self.path = workdir / JSONL
        self.rows = [row for row in (read_rows(workdir) if self.path.exists() else [])
                     if row["step"] <= start]
        self._write()

    def _write(self):
        paths.write_text(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        # JSON has no NaN: a mean over no example (all steps of a window skipped) is left out.
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items() if math.isfinite(float(v))}}
        self.rows.append(row)
        self._write()


class TensorBoardWriter:
    """Scalars as TensorBoard events in `directory`, flushed at every row."""

    def __init__(self, directory: str):
        from tensorboard import summary  # pylint: disable=import-outside-toplevel
        self._writer = summary.Writer(directory)

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), step=int(step))
        self._writer.flush()

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class Writers:
    """Several writers as one."""

    def __init__(self, writers):
        self.writers = writers

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def flush(self):
        for writer in self.writers:
            writer.flush()

    def close(self):
        for writer in self.writers:
            writer.close()


def _started(what: str, make):
    """make(); a failure as a WriterError naming `what` (TensorFlow's errors are no OSErrors)."""
    try:
        return make()
    except ImportError:  # not installed: the caller decides
        raise
    except Exception as error:
        raise WriterError(f"writing {what} failed ({type(error).__name__}: "
                          f"{validate.one_line(error)})") from error


def create(workdir: epath.Path, tensorboard_dir: str, start: int) -> Writers:
    """Log lines; on process 0 also metrics.jsonl (its rows up to `start` kept) and TensorBoard
    events in `tensorboard_dir` ("" for none). A writer that cannot start raises WriterError."""
    writers = [LogWriter()]
    if jax.process_index() != 0:
        return Writers(writers)
    writers.append(_started(workdir / JSONL, lambda: JsonlWriter(workdir, start)))
    if tensorboard_dir:
        try:
            writers.append(_started(f"the TensorBoard events in {tensorboard_dir}",
                                    lambda: TensorBoardWriter(tensorboard_dir)))
        except ImportError:
            logging.warning("TensorBoard events are not written: TensorBoard is not installed "
                            "(metrics.jsonl has every scalar)")
    return Writers(writers)
