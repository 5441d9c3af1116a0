"""A process of a two-process run killed (kill -9) mid-run: the survivor ends in one line saying
what happened and what is saved, with exit status 1, in bounded time; no abort (SIGABRT) and no
crash dump from JAX's shutdown barrier."""

import os
import signal
import subprocess
import time

import pytest

import test_pods
from runs import REPO, main_command

# Long enough that the kill lands mid-run.
RUN = {**test_pods.RUN, "train.num_steps": 400, "checkpoint.every_steps": 5}


# Process 1 killed: where process 0, which hosts JAX's coordination service, dies, JAX's client
# aborts the survivors itself (resnet_jax/peers.py).
@pytest.mark.parametrize("victim", [1])
def test_a_dead_peer_ends_the_survivor_in_one_line(tmp_path, victim):
    address = f"localhost:{test_pods._free_port()}"
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
        processes[victim].send_signal(signal.SIGKILL)
        killed = time.time()
        survivor = processes[1 - victim]
        _, stderr = survivor.communicate(timeout=300)
        waited = time.time() - killed
    finally:
        for p in processes:
            p.kill()
    assert survivor.returncode == 1, _without_module_lists(stderr)[-3000:]
    last = stderr.rstrip().splitlines()[-1]
    assert last.startswith("resnet_jax: error: ") and "another process" in last, stderr[-3000:]
    assert "checkpoint" in last
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr
    # Well before the coordination service's heartbeat timeout (100 s) would abort it.
    assert waited < 60


def _without_module_lists(text):
    return "\n".join(line for line in text.splitlines() if not line.startswith("Extension modules"))
