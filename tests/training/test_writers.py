"""The metric writers: the same rows in the log, metrics.jsonl and TensorBoard's events, with and
without TensorFlow; process 0 alone writes files; a JAX profile of the steps asked for."""

import glob
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from resnet_jax.run import jsonl
from resnet_jax.training import metrics, writers
from runs import REPO

ROWS = [(10, {"train_loss": 2.5, "learning_rate": 0.1}), (20, {"train_loss": 1.75, "eval_accuracy": 0.5})]


def events(directory) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in `directory`'s event files, read by TensorBoard."""
    found = []
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                found.append((event.step, value.tag, float(tensor_util.make_ndarray(value.tensor))))
    return sorted(found)


def expected_events():
    # TensorBoard keeps scalars as float32.
    return sorted((step, name, float(np.float32(value))) for step, row in ROWS for name, value in row.items())


def test_each_row_is_logged_written_to_metrics_jsonl_and_to_tensorboard(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(logging, "info", lambda message, *args: lines.append(message % args))
    writer = writers.create(epath.Path(tmp_path), str(tmp_path / "tb"), start=0)
    for step, row in ROWS:
        writer.write_scalars(step, row)
    writer.close()
    assert lines == ["[10] learning_rate=0.1, train_loss=2.5", "[20] eval_accuracy=0.5, train_loss=1.75"]
    assert jsonl.read_rows(tmp_path) == [{"step": step, **row} for step, row in ROWS]
    assert events(tmp_path / "tb") == expected_events()


def test_a_restarted_run_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    first = writers.create(epath.Path(tmp_path), "", start=0)
    for step, row in ROWS:
        first.write_scalars(step, row)
    first.close()
    again = writers.create(epath.Path(tmp_path), "", start=15)  # step 20 was not saved
    again.write_scalars(20, {"train_loss": 1.5})
    assert jsonl.read_rows(tmp_path) == [{"step": 10, **ROWS[0][1]}, {"step": 20, "train_loss": 1.5}]


def test_a_non_finite_value_is_left_out_of_metrics_jsonl(tmp_path):
    writer = writers.create(epath.Path(tmp_path), "", start=0)
    writer.write_scalars(5, {"train_loss": float("nan"), "learning_rate": 0.1})
    assert jsonl.read_rows(tmp_path) == [{"step": 5, "learning_rate": 0.1}]


def test_other_processes_write_log_lines_only(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = writers.create(epath.Path(tmp_path), str(tmp_path / "tb"), start=0)
    assert [type(w) for w in writer.writers] == [writers.LogWriter]
    writer.write_scalars(1, {"train_loss": 1.0})
    assert os.listdir(tmp_path) == []


WITHOUT_TENSORFLOW = textwrap.dedent("""
    import sys
    sys.modules["tensorflow"] = None  # as where it is not installed
    from etils import epath
    from resnet_jax.training import writers
    workdir = epath.Path(sys.argv[1])
    writer = writers.create(workdir, str(workdir / "tb"), start=0)
    for step, row in {rows!r}:
        writer.write_scalars(step, row)
    writer.close()
""")


def test_tensorboard_events_are_written_without_tensorflow(tmp_path):
    subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW.format(rows=ROWS), str(tmp_path)],
                   cwd=REPO, check=True, timeout=300)
    assert jsonl.read_rows(tmp_path) == [{"step": step, **row} for step, row in ROWS]
    assert events(tmp_path / "tb") == expected_events()


def test_profile_steps_trace_the_steps_asked_for(tmp_path):
    assert metrics.profile_hooks(0, str(tmp_path)) == []
    (hook,) = metrics.profile_hooks(2, str(tmp_path))
    for step in (1, 2, 3):
        hook(step)
        jax.block_until_ready(jnp.ones(4) * step)
    traces = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
