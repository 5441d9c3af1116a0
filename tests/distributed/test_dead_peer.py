"""A process of a two-process run killed (kill -9) mid-run: the survivor ends in one line saying
what happened (which process died, where that is known) and what is saved, with exit status 1,
in bounded time; no abort (SIGABRT) and no crash dump on the terminal."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import test_pods
from runs import REPO, free_port, main_command

pytestmark = pytest.mark.slow  # every test here takes seconds: none is in the fast tier

# Long enough that the kill lands mid-run.
RUN = {**test_pods.RUN, "train.num_steps": 400, "checkpoint.every_steps": 5}


def _child(pid: int) -> int:
    """The pid of the run's process under `pid`, its parent (`resnet_jax/distributed/supervisor.py`)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # a process that ended meanwhile
                continue
            if int(fields[1]) == pid:
                return int(stat.parent.name)
        time.sleep(0.1)
    raise AssertionError(f"no child of {pid}")


# Which process is killed, and whether its run's process (as the out-of-memory killer would) or
# the one the launcher started (its parent, which the run's process does not outlive). Process
# 0 hosts JAX's coordination service: there JAX's client aborts the survivor itself.
@pytest.mark.parametrize("victim, killed", [(1, "run"), (0, "run"), (1, "launched")])
def test_a_dead_peer_ends_the_survivor_in_one_line(tmp_path, victim, killed):
    address = f"localhost:{free_port()}"
    processes = [subprocess.Popen(
        main_command(tmp_path, f"--coordinator_address={address}", "--num_processes=2",
                     f"--process_id={i}", **RUN),
        cwd=REPO, env=test_pods.ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        checkpoints, deadline = tmp_path / "checkpoints", time.time() + 600
        while not (checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 10
                                                for p in checkpoints.iterdir())):
            assert all(p.poll() is None for p in processes) and time.time() < deadline
            time.sleep(0.1)
        target = processes[victim].pid
        run = _child(target)
        os.kill(run if killed == "run" else target, signal.SIGKILL)
        killed_at = time.time()
        survivor = processes[1 - victim]
        _, stderr = survivor.communicate(timeout=300)
        waited = time.time() - killed_at
        processes[victim].wait(timeout=60)
    finally:
        for p in processes:
            p.kill()
    assert survivor.returncode == 1, _without_module_lists(stderr)[-3000:]
    lines = stderr.rstrip().splitlines()
    assert lines[-1].startswith("resnet_jax: error: "), stderr[-3000:]
    if killed == "run":  # named by the note its parent left
        assert f"process {victim} of 2 was killed (SIGKILL" in lines[-1], lines[-1]
    else:  # nothing was left to say which
        assert "another process of this run has died" in lines[-1], lines[-1]
        assert not Path(f"/proc/{run}").exists() or "Z" in Path(f"/proc/{run}/stat").read_text()
    assert "checkpoint" in lines[-1] and len(lines) < 60, stderr[-3000:]
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr[-3000:]
    # Well before the coordination service's heartbeat timeout (100 s) would abort it.
    assert waited < 90, (waited, lines[-3:])


def _without_module_lists(text):
    return "\n".join(line for line in text.splitlines() if not line.startswith("Extension modules"))
