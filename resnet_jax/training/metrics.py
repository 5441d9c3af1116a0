"""Metrics: clu collections for the steps, clu writers, WORKDIR/metrics.jsonl for scripts, and
the speed of each host.

Accuracies are fractions. Eval metrics are sums over the unmasked examples divided by their
count (clu's Average with a mask), so padding never counts and no mean of batch means is taken.
"""

import contextlib
import importlib.util
import json
import math
import time
from typing import Any

import flax
import jax
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax import flops
from resnet_jax.run import paths, validate
from resnet_jax.run.jsonl import JSONL, read_rows  # noqa: F401  (also metrics.read_rows)

# clu's writers and periodic actions import TensorFlow. Without it (data.on_device=True needs
# none) the small equivalents below log the same things and write metrics.jsonl, and
# TensorBoard's own writer writes the events.
TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
if TENSORFLOW:
    from clu import metric_writers
    from clu import periodic_actions
    _WriterBase = metric_writers.MetricWriter
else:
    metric_writers = periodic_actions = None
    _WriterBase = object

# What `Window` reports: timings, which differ from run to run.
SPEED = ("images_per_second", "images_per_second_per_device", "step_seconds", "data_wait_seconds",
         "data_wait_host", "mfu")


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Average.from_output("accuracy")
    learning_rate: clu_metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Average.from_output("accuracy")
    top5_accuracy: clu_metrics.Average.from_output("top5_accuracy")


class JsonlWriter(_WriterBase):
    """One JSON object per write, {"step": N, name: value, ...}, in WORKDIR/metrics.jsonl.

    Object stores cannot append, so the writer keeps the rows and writes the file whole each
    time (a quickstart row with eval is 422 bytes: about 2.5 MB for the 6,000 log lines of a
    600k-step run logged every 100). Started at step `start`, it keeps the rows up
    to `start` and forgets those a stopped run wrote after its last checkpoint: this run writes
    them again.
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

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class WriterError(OSError):
    """A writer that could not start (a full disk), its message naming what it writes."""


def _started(what: str, make):
    """make(); a failure as a WriterError naming `what` (TensorFlow's errors are no OSErrors)."""
    try:
        return make()
    except ImportError:  # not installed: the callers decide
        raise
    except Exception as error:
        raise WriterError(f"writing {what} failed ({type(error).__name__}: "
                          f"{validate.one_line(error)})") from error


def create_writer(workdir: epath.Path, tensorboard_dir: str, start: int):
    """Process 0: log lines, metrics.jsonl and TensorBoard events in `tensorboard_dir` ("" for
    none; TensorFlow's own file system writes them, local or gs://). Other processes: log lines.
    Without TensorFlow, the same through `_LogWriter` and `_TensorBoardWriter`. A writer that
    cannot start raises WriterError."""
    if not TENSORFLOW:
        return _writer_without_tensorflow(workdir, tensorboard_dir, start)
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(just_logging=True)
    writers = [_started(workdir / JSONL, lambda: JsonlWriter(workdir, start))]
    if tensorboard_dir:
        writers.append(_started(f"the TensorBoard events in {tensorboard_dir}", lambda: (
            metric_writers.create_default_writer(tensorboard_dir, asynchronous=False))))
    else:
        writers.append(metric_writers.create_default_writer(just_logging=True))
    return metric_writers.MultiWriter(writers)


class _LogWriter:
    """Scalars as log lines, worded as clu's LoggingWriter words them."""

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        values = [f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())]
        logging.info("[%d] %s", step, ", ".join(values))

    def flush(self):
        pass

    def close(self):
        pass


class _TensorBoardWriter:
    """Scalars as TensorBoard events through TensorBoard's own writer (no TensorFlow; local or
    any file system TensorBoard's fsspec layer serves)."""

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


class _Writers:
    def __init__(self, writers):
        self._writers = writers

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        for writer in self._writers:
            writer.write_scalars(step, scalars)

    def flush(self):
        for writer in self._writers:
            writer.flush()

    def close(self):
        for writer in self._writers:
            writer.close()


def _writer_without_tensorflow(workdir, tensorboard_dir: str, start: int):
    if jax.process_index() != 0:
        return _LogWriter()
    writers = [_started(workdir / JSONL, lambda: JsonlWriter(workdir, start)), _LogWriter()]
    if tensorboard_dir:
        try:
            writers.append(_started(f"the TensorBoard events in {tensorboard_dir}",
                                    lambda: _TensorBoardWriter(tensorboard_dir)))
        except ImportError:
            logging.warning("TensorBoard events are not written: neither TensorFlow nor "
                            "TensorBoard is installed (metrics.jsonl has every scalar)")
    return _Writers(writers)


class _Profile:
    """A JAX profiler trace of `num_profile_steps` steps from the first one it sees, in logdir."""

    def __init__(self, num_profile_steps: int, logdir: str):
        self._steps, self._logdir, self._end = num_profile_steps, logdir, None

    def __call__(self, step: int) -> None:
        if self._end is None:
            jax.profiler.start_trace(self._logdir)
            self._end = step + self._steps
        elif step == self._end:
            jax.profiler.stop_trace()


def profile_hooks(profile_steps: int, logdir: str) -> list:
    """The loop's periodic actions: on process 0 a profile of `profile_steps` steps (clu's where
    TensorFlow is installed, its equivalent here if not)."""
    if profile_steps <= 0 or jax.process_index() != 0:
        return []
    if TENSORFLOW:
        return [periodic_actions.Profile(num_profile_steps=profile_steps, logdir=logdir)]
    return [_Profile(profile_steps, logdir)]


def duration(seconds: float) -> str:
    """'45 s', '3 min 05 s', '2 h 05 min': a time left as a person reads it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress(step: int, num_steps: int, window: dict[str, float], compiled: bool = False) -> str:
    """The progress line of a log window (`Window.scalars`): where the run is, its speed, and
    the training time left at that speed (this run's own steps: a resume counts from its
    restart). `compiled`: the window holds the compile, whose time says nothing of what is left."""
    left = ("the time left follows the next window (this one compiled the step)" if compiled
            else f"{duration((num_steps - step) * window['step_seconds'])} of training left")
    return (f"step {step}/{num_steps} ({100 * step / num_steps:.1f}%), "
            f"{window['images_per_second']:.4g} images/s, {window['step_seconds']:.3g} s a step; "
            f"{left}")


def prefixed(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}_{k}" if k != "learning_rate" else k: float(v) for k, v in values.items()}


class Window:
    """The speed of the train steps since the last log line, and of every host, so that a slow
    host or a starved input shows.

    `scalars` gathers each host's seconds per step and seconds per step spent waiting for its
    next batch (one small all-gather, on every process at the same steps) and reports: the
    global images/s, and per device; `step_seconds`, of the slowest host; `data_wait_seconds`,
    of the host that waited longest, and which it is (`data_wait_host`); `mfu`, the model FLOP
    utilisation of the devices' dense bfloat16 peak where the device kind's peak is known.
    """

    def __init__(self, step: int, batch_size: int, flops_per_step: float):
        self._batch_size, self._flops_per_step = batch_size, flops_per_step
        self._peak = flops.peak_flops(jax.devices()[0].device_kind)
        self._reset(step)

    def _reset(self, step: int):
        self._began, self._step, self._waited = time.perf_counter(), step, 0.0

    @contextlib.contextmanager
    def waiting(self):
        """Around the fetch of a batch: the time it blocks is time waited for data."""
        began = time.perf_counter()
        yield
        self._waited += time.perf_counter() - began

    @contextlib.contextmanager
    def paused(self):
        """Around what is not a train step (an evaluation): its time is not counted."""
        began = time.perf_counter()
        yield
        self._began += time.perf_counter() - began

    def scalars(self, step: int) -> dict[str, float]:
        steps = step - self._step
        mine = np.array([time.perf_counter() - self._began, self._waited], np.float64) / steps
        hosts = (multihost_utils.process_allgather(mine) if jax.process_count() > 1
                 else mine[None]).reshape(-1, 2)
        seconds, waited = hosts[:, 0].max(), hosts[:, 1]
        if jax.process_count() > 1:
            logging.info("host %d: %.4f s a step, %.4f s of it waiting for data",
                         jax.process_index(), *mine)
        images_per_second = self._batch_size / seconds
        out = {"images_per_second": images_per_second,
               "images_per_second_per_device": images_per_second / jax.device_count(),
               "step_seconds": seconds, "data_wait_seconds": waited.max(),
               "data_wait_host": int(waited.argmax())}
        if self._peak:
            out["mfu"] = self._flops_per_step / seconds / (self._peak * jax.device_count())
        self._reset(step)
        return out
