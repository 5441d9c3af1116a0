"""Ghost BN (model.bn_group_size) runs stopped and resumed: bit-exact on the same device count,
within float32 rounding on another. Each group's statistics are taken about its device's running
mean (layers.py), so the per-device running statistics must come back as they were."""

import shutil
import signal
import subprocess
import time

import pytest

from resnet_jax.run import checkpoint
from runs import REPO, assert_trees_close, environment, main_command, rows_without_speed, run_main

pytestmark = pytest.mark.slow  # every test here takes seconds: none is in the fast tier

# 32 examples on 4 devices: 2 groups of 4 on each.
GHOST = {"model.bn_group_size": 4, "train.num_steps": 24, "checkpoint.every_steps": 4,
         "eval.every_steps": 12}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    run_main(workdir, devices=4, **GHOST)
    return workdir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A workdir of the run stopped by SIGTERM after its checkpoint of step 8 or later; each test
    resumes a copy."""
    workdir = tmp_path_factory.mktemp("stopped")
    stop_after_a_checkpoint(workdir)
    return workdir


def stop_after_a_checkpoint(workdir):
    """Starts the run on 4 devices and SIGTERMs it once a checkpoint past step 4 is on disk."""
    process = subprocess.Popen(main_command(workdir, **GHOST), cwd=REPO, env=environment(4),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints, deadline = workdir / "checkpoints", time.time() + 300
    while not (checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 8
                                            for p in checkpoints.iterdir())):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stderr[-3000:]
    step, _ = checkpoint.read_latest(str(workdir))
    assert step < GHOST["train.num_steps"]


def final_state(workdir):
    step, state = checkpoint.read_latest(str(workdir))
    assert step == GHOST["train.num_steps"]
    return state


def test_a_stopped_ghost_bn_run_resumes_bit_exactly(tmp_path, uninterrupted, stopped):
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    run_main(tmp_path, devices=4, **GHOST)
    resumed, whole = final_state(tmp_path), final_state(uninterrupted)
    for part in ("params", "model_state", "device_stats"):
        assert_trees_close(resumed[part], whole[part], rtol=0, atol=0)
    assert rows_without_speed(tmp_path) == rows_without_speed(uninterrupted)


@pytest.mark.parametrize("devices", [2, 8])
def test_a_ghost_bn_run_resumes_on_another_device_count(tmp_path, uninterrupted, stopped, devices):
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    result = run_main(tmp_path, devices=devices, **GHOST)
    assert "Restored the checkpoint of step" in result.stderr
    resumed, whole = final_state(tmp_path), final_state(uninterrupted)
    # The tolerance of tests/training/test_train.py's eight devices against one, for ghost BN.
    for part in ("params", "model_state"):
        assert_trees_close(resumed[part], whole[part], rtol=1e-4, atol=1e-5)
    assert [leaf.shape[-2] for leaf in _leaves(resumed["device_stats"])][0] == devices


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree
