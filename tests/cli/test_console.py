"""The main job's terminal output and WORKDIR/log.txt (resnet_jax/run/console.py)."""

import re
import subprocess
import sys

import pytest

import runs

STAMP = re.compile(r"^\d\d:\d\d:\d\d ")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return workdir, runs.run_main(workdir, **{"log_every_steps": 3})


def _ours(stderr: str) -> list[str]:
    # TensorFlow's C++ prints notices at import, before any Python logging (no flag stops them).
    return [line for line in stderr.splitlines() if STAMP.match(line)]


@pytest.mark.slow
def test_the_terminal_shows_the_projects_lines_and_ends_on_the_result(run):
    workdir, result = run
    lines = _ours(result.stderr)
    assert len(result.stderr.splitlines()) <= 40 and len(lines) >= 8, result.stderr
    assert not any("orbax" in line or "[process=0]" in line for line in result.stderr.splitlines())
    text = "\n".join(lines)
    assert "Devices: 1" in text and "Config " in text and "Saving the checkpoint of step 3" in text
    assert re.search(r"\[6\] .*eval_accuracy=", text)
    last = result.stderr.splitlines()[-1]
    assert STAMP.match(last) and " Finished step 6: " in last and "eval_accuracy=" in last
    assert str(workdir / "metrics.jsonl") in last and str(workdir / "log.txt") in last


@pytest.mark.slow
def test_the_log_file_keeps_every_line(run):
    workdir, result = run
    log = (workdir / "log.txt").read_text()
    assert "Finished saving checkpoint" in log  # orbax's, not on the terminal
    for line in _ours(result.stderr):  # and the terminal's lines, each
        assert line[9:] in log, line


@pytest.mark.slow
def test_verbosity_1_shows_the_libraries_too(tmp_path):
    result = runs.run_main(tmp_path, "--verbosity=1", **{"train.num_steps": 3})
    assert "Finished saving checkpoint" in result.stderr


@pytest.mark.slow
def test_bad_input_writes_no_log(tmp_path):
    workdir = tmp_path / "run"
    command = runs.main_command(workdir, **{"train.num_steps": -5})
    result = subprocess.run(command, cwd=runs.REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert not workdir.exists()


def _files(workdir):
    return {path: (path.stat().st_size, path.stat().st_mtime_ns)
            for path in workdir.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_the_same_command_on_the_finished_run_says_so_and_writes_nothing(run):
    workdir, _ = run
    before = _files(workdir)
    result = runs.run_main(workdir, **{"log_every_steps": 3})
    last = result.stderr.splitlines()[-1]
    assert " This run has finished; nothing to do. Finished step 6: " in last, result.stderr
    assert "eval_accuracy=" in last and str(workdir / "metrics.jsonl") in last
    assert "Restored" not in result.stderr and "Saving" not in result.stderr
    assert _files(workdir) == before


KERAS_AFTER_TENSORFLOW = """
import sys
from resnet_jax.run import console
console.import_tensorflow()
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("keras", "tf_keras"))
import tensorflow as tf
print(loaded, type(tf.keras.layers.Dense(2)).__name__, len(tf.data.Dataset.range(3)))
"""


def test_tensorflow_loads_without_keras_and_keras_loads_after_it():
    # TensorFlow imports Keras's optimizers as it loads (for SavedModel, never written here).
    done = subprocess.run([sys.executable, "-c", KERAS_AFTER_TENSORFLOW], cwd=runs.REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["[]", "Dense", "3"], done.stdout
