"""Metrics: clu collections for the steps, clu writers, WORKDIR/metrics.jsonl for scripts, and
the speed of each host.

Accuracies are fractions. Eval metrics are sums over the unmasked examples divided by their
count (clu's Average with a mask), so padding never counts and no mean of batch means is taken.
"""

import contextlib
import json
import math
import time
from typing import Any

import flax
import jax
import numpy as np
from absl import logging
from clu import metric_writers
from clu import metrics as clu_metrics
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax import flops, workdir as workdirs

JSONL = "metrics.jsonl"
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


def _parse(lines: list[str], path: epath.Path) -> list[dict[str, float]]:
    rows = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise ValueError(f"{path}: line {number + 1} is not JSON") from None
            # The last line cut short by a write that did not finish (a full disk).
            logging.warning("%s: dropped its last line, which is incomplete: %r", path, line[:80])
    return rows


def read_rows(workdir) -> list[dict[str, float]]:
    """The rows of WORKDIR/metrics.jsonl, local or in a bucket."""
    path = epath.Path(workdir) / JSONL
    return _parse(path.read_text().splitlines(), path)


class JsonlWriter(metric_writers.MetricWriter):
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
        workdirs.write_text(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))

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


def create_writer(workdir: epath.Path, tensorboard_dir: str, start: int) -> metric_writers.MetricWriter:
    """Process 0: log lines, metrics.jsonl and TensorBoard events in `tensorboard_dir` ("" for
    none; TensorFlow's own file system writes them, local or gs://). Other processes: log lines."""
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(just_logging=True)
    writers = [JsonlWriter(workdir, start)]
    if tensorboard_dir:
        writers.append(metric_writers.create_default_writer(tensorboard_dir, asynchronous=False))
    else:
        writers.append(metric_writers.create_default_writer(just_logging=True))
    return metric_writers.MultiWriter(writers)


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
