"""The main job as a pod runs it: two processes on localhost, four simulated devices each, every
process inside `jax.thread_guard(True)` (the main job sets it), the real command."""

import signal
import subprocess
import time

import pytest

from resnet_jax.run import jsonl
from runs import REPO, assert_trees_close, environment, free_port, latest_params, main_command

pytestmark = pytest.mark.slow  # every test here takes seconds: none is in the fast tier

# Long enough that a signal sent after the first checkpoints lands mid-run.
RUN = {"train.num_steps": 30, "checkpoint.every_steps": 5, "eval.every_steps": 30,
       "log_every_steps": 10}
ENV = environment(devices=4)


def start(workdir, changes=({}, {})):
    """The command on two processes; `changes` are each one's own overrides."""
    address = f"localhost:{free_port()}"
    return [subprocess.Popen(
        main_command(workdir, f"--coordinator_address={address}", "--num_processes=2",
                     f"--process_id={i}", **{**RUN, **changes[i]}),
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


def finish(processes, workdir):
    """Exit statuses and outputs; a hang fails with every process's Python stacks (SIGUSR1)."""
    try:
        deadline = time.time() + 400
        outputs = [p.communicate(timeout=max(1, deadline - time.time()))[0] for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.send_signal(signal.SIGUSR1)
        time.sleep(5)
        logs = "".join(f"\n--- {log.name}:\n" + log.read_text()[-6000:]
                       for log in sorted(workdir.glob("log*.txt")))
        pytest.fail(f"the processes hang; their logs' ends:{logs}")
    finally:  # a failed test leaves no process behind
        for p in processes:
            p.kill()
    return [p.returncode for p in processes], outputs


def run(workdir):
    codes, outputs = finish(start(workdir), workdir)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    run(workdir)
    return workdir


def test_two_processes_run_in_the_thread_guard_and_log_each_host(uninterrupted):
    assert latest_params(uninterrupted)[0] == RUN["train.num_steps"]
    rows = [row for row in jsonl.read_rows(uninterrupted) if "train_loss" in row]
    assert [row["step"] for row in rows] == [10, 20, 30]
    # Each host's speed gathered: the slowest step time, the host that waited longest.
    assert all(row["step_seconds"] > 0 and row["data_wait_host"] in (0, 1) for row in rows)
    assert rows[-1]["images_per_second_per_device"] * 8 == pytest.approx(rows[-1]["images_per_second"])


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_resume_is_exact(tmp_path, uninterrupted):
    processes = start(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 5
                                            for p in checkpoints.iterdir())):
        assert all(p.poll() is None for p in processes) and time.time() < deadline
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    codes, outputs = finish(processes, tmp_path)
    assert codes == [75, 75], outputs[0][-3000:] + outputs[1][-3000:]
    stopped = latest_params(tmp_path)[0]
    assert 5 <= stopped < RUN["train.num_steps"]
    for out in outputs:
        assert f"resnet_jax: stopped at step {stopped} and saved it; the same command resumes" in out

    run(tmp_path)  # the same command resumes
    steps = [row["step"] for row in jsonl.read_rows(tmp_path) if "train_loss" in row]
    assert steps == [10, 20, 30]  # no row lost or written twice
    assert_trees_close(latest_params(tmp_path)[1], latest_params(uninterrupted)[1], rtol=0, atol=0)


def test_processes_given_different_commands_are_refused_on_every_process(tmp_path):
    codes, outputs = finish(start(tmp_path, changes=({}, {"seed": 1})), tmp_path)
    assert codes == [2, 2]
    for out in outputs:
        [line] = [line for line in out.splitlines() if line.startswith("resnet_jax: error:")]
        assert "different configs or workdirs" in line
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
