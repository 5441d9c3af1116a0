"""Ctrl-C in the commands (issue 32): exit status 130 and one line on stderr, no traceback, and
no file half-written, wherever it lands (an import, a checkpoint read, a compile)."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import matplotlib.pyplot as plt
import pytest

import runs
from resnet_jax import report
from resnet_jax.analysis import figures
from resnet_jax.training import interrupt, preemption


@pytest.fixture
def run(finished_run):
    return finished_run


def _interrupted(command, when):
    """`command` started and sent SIGINT `when` seconds after, or once a line of its stderr holds
    `when`; its exit status and stderr."""
    process = subprocess.Popen(command, cwd=runs.REPO, env=runs.environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines, seen = [], threading.Event()

    def read():
        for line in process.stderr:
            lines.append(line)
            if isinstance(when, str) and when in line:
                seen.set()
    reader = threading.Thread(target=read)
    reader.start()
    if isinstance(when, str):
        assert seen.wait(timeout=120), "".join(lines)[-3000:]
    else:
        time.sleep(when)
    assert process.poll() is None, "it ended before the signal: " + "".join(lines)[-3000:]
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    reader.join()
    process.stdout.close()
    return process.returncode, "".join(lines)


def _assert_stopped(status, stderr, line):
    assert status == 130, stderr[-3000:]
    assert stderr.splitlines()[-1] == line and stderr.count(line) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("when", [1.0, 4.0])  # importing; later (reading, compiling or evaluating)
def test_ctrl_c_in_evaluate(run, tmp_path, when):
    scores = tmp_path / "scores.json"
    status, stderr = _interrupted([sys.executable, "-m", "resnet_jax.evaluate", f"--workdir={run}",
                                   f"--json={scores}"], when)
    _assert_stopped(status, stderr, "resnet_jax: stopped by Ctrl-C")
    assert os.listdir(tmp_path) == []


# Importing; and once it has read a checkpoint (its line says so): then it builds the model and
# compiles.
@pytest.mark.slow
@pytest.mark.parametrize("when", [1.0, ": the checkpoint of step"])
def test_ctrl_c_in_report(run, tmp_path, when):
    status, stderr = _interrupted([sys.executable, "-m", "resnet_jax.report", "responses", str(run),
                                   f"--out={tmp_path / 'responses.png'}",
                                   f"--json={tmp_path / 'responses.json'}"], when)
    _assert_stopped(status, stderr, "resnet_jax.report: stopped by Ctrl-C")
    assert os.listdir(tmp_path) == []


class _Exited(Exception):
    pass


def _exit(status):
    raise _Exited(status)


@pytest.fixture
def installed():
    """interrupt's handler in place, as the commands install it."""
    previous = signal.signal(signal.SIGINT, interrupt._stop)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_report_writes_a_file_waits_until_it_is_whole(tmp_path, monkeypatch,
                                                                     installed):
    monkeypatch.setattr(interrupt.os, "_exit", _exit)  # what the handler does at last, observed
    write_text = report.write_text

    def interrupted(path, text):
        signal.raise_signal(signal.SIGINT)  # the Ctrl-C lands as the file is being written
        write_text(path, text)

    monkeypatch.setattr(report, "write_text", interrupted)
    with pytest.raises(_Exited) as exited:
        report._write(tmp_path / "table.md", "| run |\n")
    assert exited.value.args == (130,)
    assert os.listdir(tmp_path) == ["table.md"] and (tmp_path / "table.md").read_text() == "| run |\n"


def test_a_figure_stopped_while_drawn_leaves_no_file(tmp_path, monkeypatch):
    figure = plt.figure()

    def drawing(file, **kwargs):
        file.write(b"\x89PNG\r\n")  # a start, then Ctrl-C as a KeyboardInterrupt (in a library)
        raise KeyboardInterrupt

    monkeypatch.setattr(figure, "savefig", drawing)
    with pytest.raises(KeyboardInterrupt):
        figures.save(figure, tmp_path / "curves.png")
    assert os.listdir(tmp_path) == []


# Importing; after the distributed start-up; holding the workdir, before the first step.
@pytest.mark.slow
@pytest.mark.parametrize("when", [1.0, "Started as", "Devices: "])
def test_ctrl_c_in_the_main_jobs_start_up(tmp_path, when):
    status, stderr = _interrupted(runs.main_command(tmp_path / "run"), when)
    assert status == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1].startswith("resnet_jax: stopped by Ctrl-C"), stderr[-3000:]
    assert not (tmp_path / "run" / "lock.json").exists()  # released: the next run starts


def test_the_line_reaches_the_terminal_while_tensorflow_loads_with_fd_2_taken():
    # console.import_tensorflow sends fd 2 to a file while TensorFlow loads; a Ctrl-C then must
    # still say its line where the command's stderr was.
    code = ("import os, signal, tempfile\n"
            "from resnet_jax.training import interrupt\n"
            "interrupt.install('resnet_jax')\n"
            "taken = tempfile.TemporaryFile()\n"
            "os.dup2(taken.fileno(), 2)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=runs.REPO, env=runs.environment(),
                            capture_output=True, text=True, timeout=60)
    _assert_stopped(result.returncode, result.stderr, "resnet_jax: stopped by Ctrl-C")


def _in_a_gc_callback():
    """A Ctrl-C landing in a gc callback, where a KeyboardInterrupt raised is reported as
    unraisable and lost (seen after the main job's "Devices:" line, in JAX's gc callback)."""
    def landing(phase, info):
        if phase == "start":
            signal.raise_signal(signal.SIGINT)

    gc.callbacks.append(landing)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(landing)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_in_a_gc_callback_is_raised_at_the_blocks_end(installed):
    with pytest.raises(KeyboardInterrupt):
        with interrupt.raising():
            _in_a_gc_callback()
            went_on = True
    assert went_on and signal.getsignal(signal.SIGINT) is interrupt._stop
    with interrupt.raising():  # raised once: the next block is not stopped by it
        pass


def test_the_training_loops_handler_does_not_take_over_after_a_ctrl_c(installed):
    with pytest.raises(KeyboardInterrupt):
        with interrupt.raising():
            _in_a_gc_callback()
            preemption.Preemption()
            pytest.fail("the loop's handler was installed")
    assert signal.getsignal(signal.SIGINT) is interrupt._stop


def test_a_second_ctrl_c_in_a_raising_block_exits_at_once(installed, monkeypatch):
    monkeypatch.setattr(interrupt.os, "_exit", _exit)
    monkeypatch.setattr(interrupt, "_pending", False)  # and so after the test
    with pytest.raises(_Exited) as exited:
        with interrupt.raising():
            signal.raise_signal(signal.SIGINT)  # noted: the block goes on (it may be stuck)
            signal.raise_signal(signal.SIGINT)
    assert exited.value.args == (130,)
