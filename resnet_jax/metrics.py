"""Metrics: clu collections for the steps, clu writers, and WORKDIR/metrics.jsonl for scripts.

Accuracies are fractions. Eval metrics are sums over the unmasked examples divided by their
count (clu's Average with a mask), so padding never counts and no mean of batch means is taken.
"""

import json
import math
import os
from typing import Any

import flax
import jax
from clu import metric_writers
from clu import metrics as clu_metrics

JSONL = "metrics.jsonl"


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


class JsonlWriter(metric_writers.MetricWriter):
    """One JSON object per write, {"step": N, name: value, ...}, appended to WORKDIR/metrics.jsonl."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, JSONL)

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        # JSON has no NaN: a mean over no example (all steps of a window skipped) is left out.
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items() if math.isfinite(float(v))}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

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


def drop_rows_after(workdir: str, step: int) -> None:
    """Forgets the rows a stopped run wrote after its last checkpoint, which a restart writes again."""
    path = os.path.join(workdir, JSONL)
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard events in the workdir, log lines and metrics.jsonl from process 0; logs elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(just_logging=True)
    return metric_writers.MultiWriter([
        metric_writers.create_default_writer(workdir, asynchronous=False), JsonlWriter(workdir)])


def prefixed(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}_{k}" if k != "learning_rate" else k: float(v) for k, v in values.items()}


def read_rows(workdir: str) -> list[dict[str, float]]:
    """The rows of WORKDIR/metrics.jsonl."""
    with open(os.path.join(workdir, JSONL)) as f:
        return [json.loads(line) for line in f if line.strip()]
