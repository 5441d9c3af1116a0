"""A full disk, whichever writer meets it, ends a run in one line: the last on stderr, exit 1,
naming what failed and the latest complete checkpoint (or that none was written), no
half-written checkpoint left, no traceback on the terminal (issue 32).

The real command on a small tmpfs (mounting one needs root: skipped otherwise), at sizes where
the disk fills at different writers; and ENOSPC injected at the writers those sizes do not
reliably reach: the log file, the TensorBoard events, metrics.jsonl, config.json.
"""

import errno
import logging as pylogging
import os
import socket
import subprocess
import sys
import time

import pytest
from absl import logging

from resnet_jax.run import checkpoint, console, jsonl, paths
from resnet_jax.training import loop, writers
from runs import REPO, environment, main_command, small_config



def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FULL = r"No space left on device"
NONE = "no checkpoint is complete: none was written to "


def complete(step: int) -> str:
    return f"the latest complete checkpoint, of step {step}, is intact in "


def half_written(workdir) -> list[str]:
    """Orbax's temporary directories (`<step>.orbax-checkpoint-tmp`, with or without a timestamp)."""
    return [str(p) for p in (workdir / "checkpoints").rglob("*.orbax-checkpoint-tmp*")]


def assert_one_line_ending(result, *what: str) -> str:
    """The run ended as every failure must; returns its last line, which says each of `what`."""
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert lines and lines[-1].startswith("resnet_jax: error: "), result.stderr[-3000:]
    assert sum(line.startswith("resnet_jax: error:") for line in lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "--- Logging error ---" not in result.stderr, \
        result.stderr[-3000:]
    assert len(lines) < 60, result.stderr
    for part in what:
        assert part in lines[-1], lines[-1]
    return lines[-1]


# The sizes, what fills each and what is left (SMALL: cifar_resnet8 on digits, 6 steps, a save at
# steps 3 and 6 of about 700 KB each, two kept; log.txt about 70 KB): which writer meets the full
# disk first varies with timing and paths, what is left does not.
SIZES = {
    "12k": NONE,  # before the first step: the TensorBoard events, metrics.jsonl or log.txt
    "120k": NONE,  # the save of step 3, log.txt or metrics.jsonl
    "1100k": complete(3),  # the save of step 6
}


def run_all(commands: dict[str, list[list[str]]]) -> dict[str, list[subprocess.CompletedProcess]]:
    """Each key's commands run at once, all of them together (they share the tests' compilation
    cache). One still running after `TIMEOUT` seconds (a pod's peer waiting) is killed: its
    returncode None, its stderr saying so."""
    processes = {key: [subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for command in each]
                 for key, each in commands.items()}
    deadline = time.monotonic() + TIMEOUT
    return {key: [_finished(process, deadline) for process in each] for key, each in processes.items()}


TIMEOUT = 400


def _finished(process: subprocess.Popen, deadline: float) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        return subprocess.CompletedProcess(process.args, None, stdout,
                                           f"{stderr}\n[killed: still running after {TIMEOUT} s]")


@pytest.fixture(scope="module")
def full_disk_runs(tmp_path_factory):
    """The real command on a tmpfs of each size, all at once; {size: (workdir, result)}."""
    root = tmp_path_factory.mktemp("full_disk")
    mounts = []
    try:
        for size in SIZES:
            mount = root / size
            mount.mkdir()
            made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                  capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"a small file system cannot be mounted here (needs root): "
                            f"{made.stderr.strip()}")
            mounts.append(mount)
        results = run_all({size: [main_command(root / size / "run")] for size in SIZES})
        yield {size: (root / size / "run", result) for size, [result] in results.items()}
    finally:
        for mount in mounts:
            subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_a_real_full_disk_ends_in_one_line_at_any_size(full_disk_runs, size):
    workdir, result = full_disk_runs[size]
    line = assert_one_line_ending(result, SIZES[size])
    assert FULL in line, line
    assert not half_written(workdir)


@pytest.fixture
def log_file(monkeypatch):
    """console's log file handler, as the main job installs it (INFO records); closed afterwards."""
    level = pylogging.getLogger("absl").level  # NOTSET where no test set it: the root's
    logging.set_verbosity(logging.INFO)
    monkeypatch.setattr(console, "_ended", False)
    handler = console._LogFile()
    monkeypatch.setattr(console, "_log_file", handler)
    pylogging.getLogger().addHandler(handler)
    yield handler
    console.close()
    pylogging.getLogger("absl").setLevel(level)


class _FillsAfter:
    """A log file whose disk is full from the line holding `trigger` on."""

    def __init__(self, path, mode, trigger):
        self._file, self._trigger, self._full = open(path, mode), trigger, False  # noqa: SIM115

    def write(self, text):
        if self._full:
            raise enospc()
        self._full = self._trigger in text
        self._file.write(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self._full:
            raise enospc()
        self._file.flush()

    def close(self):
        self._file.close()


def test_a_full_log_file_stops_the_run_in_one_line(tmp_path, monkeypatch, log_file, capfd):
    # Its flush raised out of the logging call that wrote it ("Saving the checkpoint of step 3"),
    # after Python's '--- Logging error ---' traceback where a handler reports its errors.
    trigger = "Saving the checkpoint of step 3"
    monkeypatch.setattr(console, "open", lambda path, mode: _FillsAfter(path, mode, trigger),
                        raising=False)
    log = tmp_path / "log.txt"
    expected = (rf"^writing the log file {log} failed \(OSError: \[Errno 28\] {FULL}\); "
                rf"{complete(3)}")
    with pytest.raises(loop.TrainingError, match=expected):
        loop.train_and_evaluate(small_config(), str(tmp_path))
    assert console.failure().startswith(f"writing the log file {log} failed")
    pylogging.getLogger("a.library").error("written to the terminal only")  # and no error
    assert "Logging error" not in capfd.readouterr().err
    assert log.read_text().rstrip().endswith(trigger)
    assert not half_written(tmp_path)


@pytest.mark.parametrize("when", ["start", "step 4"])
def test_full_tensorboard_events_stop_the_run_in_one_line(tmp_path, monkeypatch, when):
    # TensorFlow raises its own ResourceExhaustedError, no OSError: at the start it went past
    # every handler, a traceback.
    tf = pytest.importorskip("tensorflow")
    from tensorboard import summary  # pylint: disable=import-outside-toplevel
    error = tf.errors.ResourceExhaustedError(None, None, f"{tmp_path}/events.out.tfevents; {FULL}")
    if when == "start":
        def init(self, output):
            raise error

        monkeypatch.setattr(summary.Writer, "__init__", init)
        raised = writers.WriterError
        expected = rf"^writing the TensorBoard events in {tmp_path} failed \(ResourceExhaustedError: .*{FULL}\)$"
    else:
        add_scalar = summary.Writer.add_scalar

        def add_scalar_until_4(self, tag, data, step, **kwargs):
            if step == 4:
                raise error
            add_scalar(self, tag, data, step, **kwargs)

        monkeypatch.setattr(summary.Writer, "add_scalar", add_scalar_until_4)
        raised = loop.TrainingError
        expected = rf"^writing the metrics of step 4 failed \(ResourceExhaustedError: .*{FULL}\); {complete(3)}"
    with pytest.raises(raised, match=expected):
        loop.train_and_evaluate(small_config(), str(tmp_path))
    assert not half_written(tmp_path)


def test_a_full_metrics_file_at_the_start_is_named(tmp_path, monkeypatch):
    real = paths.write_text

    def write_text(path, text):
        if path.name == jsonl.JSONL:
            raise enospc()
        real(path, text)

    monkeypatch.setattr(writers.paths, "write_text", write_text)
    with pytest.raises(writers.WriterError,
                       match=rf"^writing {tmp_path / jsonl.JSONL} failed \(OSError: \[Errno 28\] {FULL}\)$"):
        loop.train_and_evaluate(small_config(), str(tmp_path))


def test_a_failed_save_in_flight_leaves_nothing_when_another_writer_stops_the_run(tmp_path, monkeypatch):
    # The save of step 3 fails in the background; metrics.jsonl fails at step 4, before the loop
    # looks at the save again. What is left is said after the save settled, its directory gone.
    def finalize(self, directory):
        raise enospc()

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointHandler, "finalize", finalize)
    write = writers.JsonlWriter.write_scalars

    def write_scalars(self, step, scalars):
        if step == 4:
            raise enospc()
        write(self, step, scalars)

    monkeypatch.setattr(writers.JsonlWriter, "write_scalars", write_scalars)
    with pytest.raises(loop.TrainingError, match=rf"^writing the metrics of step 4 failed \(OSError: "
                       rf"\[Errno 28\] {FULL}\); {NONE}"):
        loop.train_and_evaluate(small_config(), str(tmp_path))
    assert not half_written(tmp_path)


# The real command with ENOSPC injected. argv[1]: the workdir file whose write fails
# (config.json); log:TEXT, the log file full from the line holding TEXT on; or save:STEP, the
# save of STEP failing in orbax's background thread.
INJECTED = """
import errno, os, runpy, sys
from orbax.checkpoint._src.checkpointers import async_checkpointer
from resnet_jax.run import console, paths

what = sys.argv.pop(1)
real_write, real_open = paths.write_text, open
real_commit = async_checkpointer._background_wait_for_commit_futures


def full():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class Full:
    def __init__(self, path, mode):
        self.file = real_open(path, mode)
        self.full = False

    def write(self, text):
        self.full = self.full or what[len("log:"):] in text
        if self.full:
            raise full()
        self.file.write(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


def write_text(path, text):
    if path.name == what:
        raise full()
    real_write(path, text)


def commit(directory, *args, **kwargs):
    if directory.name.split(".")[0] == what[len("save:"):]:
        raise full()
    return real_commit(directory, *args, **kwargs)


if what.startswith("log:"):
    console.open = Full
elif what.startswith("save:"):
    async_checkpointer._background_wait_for_commit_futures = commit
else:
    paths.write_text = write_text
runpy.run_module("resnet_jax.main", run_name="__main__", alter_sys=True)
"""


def injected_command(what: str, workdir, *flags, **changes) -> list[str]:
    return [sys.executable, "-c", INJECTED, what, *main_command(workdir, *flags, **changes)[3:]]


SAVE_LIMIT = {"checkpoint.timeout_seconds": 10}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def injected_runs(tmp_path_factory):
    """{case: (workdir, [result of each process])}, all at once: ENOSPC at config.json; at
    log.txt from the result's line on (after the loop last looked); two processes: at process 1's
    log file from the save of step 3 on, or in process 1's save of step 3 (in the background)."""
    root = tmp_path_factory.mktemp("injected")
    pod = [f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
    save = [f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
    commands = {
        "config.json": [injected_command("config.json", root / "config")],
        "log.txt": [injected_command("log:Finished step", root / "log")],
        "pod": [main_command(root / "pod", *pod, "--process_id=0"),
                injected_command("log:Saving the checkpoint of step 3", root / "pod", *pod,
                                 "--process_id=1")],
        # The save's time limit: how long process 0 waits at orbax's barrier for process 1.
        "pod save": [main_command(root / "save", *save, "--process_id=0", **SAVE_LIMIT),
                     injected_command("save:3", root / "save", *save, "--process_id=1",
                                      **SAVE_LIMIT)],
    }
    results = run_all(commands)
    return {case: (root / name, results[case])
            for case, name in (("config.json", "config"), ("log.txt", "log"), ("pod", "pod"),
                               ("pod save", "save"))}


@pytest.mark.slow
def test_a_full_disk_at_config_json_ends_in_one_line(injected_runs):
    # An OSError out of the run went past main's handlers: a traceback.
    workdir, [result] = injected_runs["config.json"]
    assert_one_line_ending(result, f"[Errno 28] {FULL}", NONE)
    assert not (workdir / "config.json").exists()


@pytest.mark.slow
def test_a_log_file_full_after_the_last_step_ends_in_one_line(injected_runs):
    # The run finished; its log file lost its last lines: said, exit 1, not a silent success.
    workdir, [result] = injected_runs["log.txt"]
    line = assert_one_line_ending(result, f"writing the log file {workdir / 'log.txt'} failed",
                                  f"[Errno 28] {FULL}", complete(6))
    assert " Finished step 6: " in result.stderr.splitlines()[-2], result.stderr[-2000:]
    assert "Finished step" not in (workdir / "log.txt").read_text(), line


@pytest.mark.slow
def test_a_full_log_file_on_one_process_stops_every_process(injected_runs):
    # Process 1 stopped alone (a traceback) and process 0 waited for it in its next collective.
    workdir, [first, second] = injected_runs["pod"]
    assert_one_line_ending(second, f"writing the log file {workdir / 'log.process-1.txt'} failed",
                           f"[Errno 28] {FULL}", complete(3))
    assert_one_line_ending(first, "process 1 could not write its metrics or log file at step 4",
                           complete(3))


@pytest.mark.slow
def test_a_save_failing_on_one_process_stops_every_process(injected_runs):
    # Process 1 went on alone: it raised at its next save, where process 0 waited at orbax's
    # barrier, and each ended with its own line (or process 0 entered the next step alone).
    workdir, [first, second] = injected_runs["pod save"]
    assert_one_line_ending(second, f"saving the checkpoint of step 3 failed ([Errno 28] {FULL})",
                           NONE)
    assert_one_line_ending(first, "saving the checkpoint of step 3 failed on process 1 (its own "
                           "line says why)", NONE)
    assert not half_written(workdir)
