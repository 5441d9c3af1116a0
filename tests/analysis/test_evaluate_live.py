"""python -m resnet_jax.evaluate beside a run that is still training: the run deletes old steps
(orbax keeps the last checkpoint.keep) while evaluate reads them, and evaluate must read a
consistent checkpoint, not report the step it lost as corrupt (issue 32)."""

import gc
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from etils import epath

import runs
from resnet_jax import evaluate
from resnet_jax.run import checkpoint, live

EVALUATE = [sys.executable, "-m", "resnet_jax.evaluate"]
DEVICE = jax.sharding.make_single_device_sharding(jax.devices()[0])


@pytest.fixture
def finished(finished_run):
    return finished_run


@pytest.fixture
def workdir(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def _saved(workdir, step, new):
    """What a live run does between a listing and a read: saves step `new` (here a copy of `step`,
    committed by a rename as orbax commits) and deletes `step`."""
    checkpoints = workdir / "checkpoints"
    shutil.copytree(checkpoints / str(step), checkpoints / f"{new}.orbax-checkpoint-tmp")
    (checkpoints / f"{new}.orbax-checkpoint-tmp").rename(checkpoints / str(new))
    shutil.rmtree(checkpoints / str(step))


def _read_with(monkeypatch, before_read):
    """checkpoint.read with `before_read(step)` done first; the steps it was asked for."""
    asked, read = [], checkpoint.read

    def reading(manager, step, sharding):
        asked.append(step)
        before_read(step)
        return read(manager, step, sharding)

    monkeypatch.setattr(checkpoint, "read", reading)
    return asked


def _arrays(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["latest", "best"])
def test_a_step_deleted_between_listing_and_reading_is_read_again_as_the_newest(workdir, monkeypatch, which):
    manager = checkpoint.reader(epath.Path(workdir))
    chosen = live.checkpoint_step(manager, which)
    expected = _arrays(checkpoint.read(manager, chosen, DEVICE))
    asked = _read_with(monkeypatch, lambda step: _saved(workdir, step, 100) if step == chosen else None)
    step, tree = live.read_checkpoint(manager, which, DEVICE)
    assert asked == [chosen, 100] and step == 100
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(tree), expected, strict=True))


@pytest.mark.slow
def test_a_run_between_deleting_its_one_step_and_committing_the_next_is_waited_for(workdir, monkeypatch, tmp_path):
    # checkpoint.keep=1: for a moment no step is listed.
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints / "3")
    manager = checkpoint.reader(epath.Path(workdir))

    def between(step):
        if step == 6:
            (checkpoints / "6").rename(tmp_path / "saving")
            threading.Timer(0.5, (tmp_path / "saving").rename, [checkpoints / "7"]).start()

    asked = _read_with(monkeypatch, between)
    step, _ = live.read_checkpoint(manager, "latest", DEVICE, grace=10)
    assert asked == [6, 7] and step == 7


@pytest.mark.slow
def test_a_listing_made_as_the_only_step_was_replaced_waits_for_the_next(workdir, tmp_path):
    # orbax lists the directory, then looks at each step: a save committed and the older step
    # deleted between the two leave it listing none.
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints / "3")
    (checkpoints / "6").rename(checkpoints / "7.orbax-checkpoint-tmp")
    manager = checkpoint.reader(epath.Path(workdir))
    assert manager.all_steps() == []
    threading.Timer(0.5, (checkpoints / "7.orbax-checkpoint-tmp").rename, [checkpoints / "7"]).start()
    step, _ = live.read_checkpoint(manager, "latest", DEVICE, grace=10)
    assert step == 7


def test_a_directory_without_checkpoints_is_said_so_at_once(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    manager = checkpoint.reader(epath.Path(tmp_path))
    began = time.monotonic()
    with pytest.raises(ValueError, match="there is no checkpoint in"):
        live.read_checkpoint(manager, "latest", DEVICE, grace=10)
    assert time.monotonic() - began < 5


@pytest.mark.slow
def test_a_named_step_deleted_while_read_is_said_so(workdir, monkeypatch):
    manager = checkpoint.reader(epath.Path(workdir))
    _read_with(monkeypatch, lambda step: _saved(workdir, step, 100))
    with pytest.raises(live.StepDeleted, match="step 3 was deleted .* while it was being read"):
        live.read_checkpoint(manager, "3", DEVICE)


@pytest.mark.slow
def test_a_step_whose_deletion_is_under_way_is_not_called_corrupt(workdir, monkeypatch):
    # Its directory is still there when the read fails, and gone a moment later.
    def failing(step):
        threading.Timer(0.3, shutil.rmtree, [workdir / "checkpoints" / str(step)]).start()
        raise ValueError("NOT_FOUND: Error opening ... _sharding")  # as tensorstore says it

    manager = checkpoint.reader(epath.Path(workdir))
    _read_with(monkeypatch, failing)
    with pytest.raises(live.StepDeleted, match="step 3 was deleted"):
        live.read_checkpoint(manager, "3", DEVICE, grace=10)


@pytest.mark.slow
@pytest.mark.parametrize("which, step", [("latest", 6), ("3", 3)])
def test_a_step_that_stays_and_fails_to_read_is_corrupt(workdir, monkeypatch, which, step):
    def failing(_):
        raise ValueError("Truncated Zstd-compressed stream")

    manager = checkpoint.reader(epath.Path(workdir))
    asked = _read_with(monkeypatch, failing)
    start = time.monotonic()
    with pytest.raises(checkpoint.CorruptCheckpoint,
                       match=f"checkpoint of step {step} .* is corrupt or unreadable .*Truncated Zstd"):
        live.read_checkpoint(manager, which, DEVICE, grace=0.5)
    assert asked == [step]
    # The newest step is never deleted by the run: no wait before calling it corrupt.
    assert which != "latest" or time.monotonic() - start < 0.5


@pytest.mark.slow
def test_a_run_saving_faster_than_evaluate_reads_is_said_so_in_one_line(workdir, monkeypatch):
    _read_with(monkeypatch, lambda step: _saved(workdir, step, step + 1))
    manager = checkpoint.reader(epath.Path(workdir))
    with pytest.raises(live.SavingTooFast) as raised:
        live.read_checkpoint(manager, "latest", DEVICE)
    message = str(raised.value)
    assert "is saving checkpoints faster than they can be read" in message and "checkpoint.keep" in message
    assert "\n" not in message


def _start_evaluate(workdir, output):
    """evaluate with its stdout and stderr in files under `output` (a pipe left unread while it
    runs would fill and stop it)."""
    output.mkdir(exist_ok=True)
    name = output / str(len(list(output.iterdir())))
    with open(f"{name}.out", "w") as stdout, open(f"{name}.err", "w") as stderr:
        process = subprocess.Popen([*EVALUATE, f"--workdir={workdir}"], cwd=runs.REPO,
                                   env=runs.environment(), stdout=stdout, stderr=stderr)
    process.output = name
    return process


def _ended(process):
    return (process.returncode,
            *(pathlib.Path(f"{process.output}.{kind}").read_text() for kind in ("out", "err")))


def _counting_failed_reads(monkeypatch):
    """checkpoint.read that records the steps of the reads that failed."""
    failed, read = [], checkpoint.read

    def counted(manager, step, sharding):
        try:
            return read(manager, step, sharding)
        except Exception:
            failed.append(step)
            raise

    monkeypatch.setattr(checkpoint, "read", counted)
    return failed


def _read_beside(workdir):
    """The step of one `read_checkpoint` of the latest step, as evaluate reads it; None where the
    run saved faster than it could be read."""
    try:
        return live.read_checkpoint(live.reader(epath.Path(workdir)), "latest", DEVICE)[0]
    except live.SavingTooFast:
        return None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see quiet_closed_loop
def test_evaluate_beside_a_run_that_saves_every_step(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115  (a file: a pipe left unread would fill)
    trainer = subprocess.Popen(
        runs.main_command(workdir, **{"checkpoint.keep": 1, "checkpoint.every_steps": 1,
                                      "train.num_steps": 60, "eval.every_steps": 30,
                                      "log_every_steps": 10}),
        cwd=runs.REPO, env=runs.environment(), stdout=log, stderr=subprocess.STDOUT)
    running, results, reads, failed = [], [], [], _counting_failed_reads(monkeypatch)
    try:
        checkpoints = workdir / "checkpoints"
        deadline = time.monotonic() + 120
        while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
            assert trainer.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.05)
        # Two evaluates at a time, started again as each ends, as long as the run trains; meanwhile
        # many reads here, each as evaluate reads (an evaluate spends most of its time importing).
        output = tmp_path / "evaluates"
        running += [_start_evaluate(workdir, output) for _ in range(2)]
        while running:
            ended = [p for p in running if p.poll() is not None]
            for process in ended:
                results.append(_ended(process))
                running.remove(process)
                if trainer.poll() is None:
                    running.append(_start_evaluate(workdir, output))
            if trainer.poll() is None:
                reads.append(_read_beside(workdir))
            else:
                time.sleep(0.1)
        assert trainer.wait(timeout=120) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        for process in [trainer, *running]:
            if process.poll() is None:
                process.kill()
        log.close()
    assert len(results) >= 2
    for code, stdout, stderr in results:
        assert "Traceback" not in stderr and "corrupt" not in stderr.lower(), stderr[-3000:]
        assert "InitializeLog" not in stderr and "oneDNN" not in stderr, stderr[:3000]
        if code == 0:
            assert "eval_accuracy=" in stdout, stdout
        else:
            assert code == evaluate.SAVING_TOO_FAST_STATUS, stderr[-3000:]
            assert "is saving checkpoints faster than they can be read" in stderr.splitlines()[-1]
    gc.collect()  # the failed reads' tensorstore futures: their warnings counted here, filtered above
    # The reads here met the run's deletions (a quarter of them on a 2-core CPU) and got past them.
    assert failed and sum(step is not None for step in reads) > len(reads) / 2, (reads, failed)
