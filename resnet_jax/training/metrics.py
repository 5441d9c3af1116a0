"""Metrics: clu collections for the steps, the speed of each host and the progress line (the
writers that write them: `writers`).

Accuracies are fractions. Eval metrics are sums over the unmasked examples divided by their
count (clu's Average with a mask), so padding never counts and no mean of batch means is taken.
"""

import contextlib
import time
from typing import Any

import flax
import jax
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils

from resnet_jax import flops

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


class _Profile:
    """A JAX profiler trace of `num_profile_steps` steps from the first one it sees, in logdir
    (clu's Profile is the same, but clu's periodic actions import TensorFlow)."""

    def __init__(self, num_profile_steps: int, logdir: str):
        self._steps, self._logdir, self._end = num_profile_steps, logdir, None

    def __call__(self, step: int) -> None:
        if self._end is None:
            jax.profiler.start_trace(self._logdir)
            self._end = step + self._steps
        elif step == self._end:
            jax.profiler.stop_trace()


def profile_hooks(profile_steps: int, logdir: str) -> list:
    """The loop's periodic actions: on process 0 a profile of `profile_steps` steps."""
    if profile_steps <= 0 or jax.process_index() != 0:
        return []
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
