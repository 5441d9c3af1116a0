"""Launchers: sweep expansion of the paper's sweeps, the commands of each mode, bad sweeps, a real
local sweep. Nothing here reaches a cloud or a cluster: gcloud and srun only ever run as dry runs
or fakes."""

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from launch import sweep, tpu_pod
from resnet_jax.distributed import clusters, sharding
from runs import LAUNCH_PREFIXES, REPO, SMALL, environment, without_launch_environment

PYTHON = sys.executable
SAFE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")


def command(*args, check=True):
    result = subprocess.run([PYTHON, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def planned(*args):
    """The dry-run plan of launch.sweep: (name, workdir, argv) per line."""
    lines = command("launch.sweep", *args, "--dry-run").stdout.splitlines()
    return [(name, workdir, shlex.split(cmd)) for name, workdir, cmd in (line.split("\t") for line in lines)]


def effective_config(run):
    """What main would train for `run`: its config file with its overrides set."""
    config = sweep.load_config(run.config)
    for field, value in run.overrides:
        *sections, leaf = field.split(".")
        node = config
        for section in sections:
            node = node[section]
        setattr(node, leaf, value)  # the paper's sweeps set strings only
    return config


# Sec. 4.2: ResNet-110 and deeper warm up until the training error is below 80%.
CIFAR_WARMUP = {20: 0.0, 32: 0.0, 44: 0.0, 56: 0.0, 110: 0.8, 1202: 0.8}

# sweep -> [(run name, --config, overrides, model trained)]
PAPER_SWEEPS = {
    "configs/sweep_table2.py": [
        (model, "configs/sweep_table2.py", (("model.name", model),), model)
        for model in ("plain18", "plain34", "resnet18", "resnet34")],
    "configs/sweep_table3.py": [
        (f"shortcut-{option}", "configs/sweep_table3.py", (("model.shortcut", option),), "resnet34")
        for option in "ABC"],
    "configs/sweep_table6.py": [
        (f"cifar_depth-{depth}", f"configs/cifar.py:depth={depth}", (), f"cifar_resnet{depth}")
        for depth in (20, 32, 44, 56, 110, 1202)],
    "configs/sweep_fig6.py": [
        (f"cifar_depth-{depth}_plain-True", f"configs/cifar.py:depth={depth},plain=True", (),
         f"cifar_plain{depth}") for depth in (20, 32, 44, 56)] + [
        (f"cifar_depth-{depth}_plain-False", f"configs/cifar.py:depth={depth},plain=False", (),
         f"cifar_resnet{depth}") for depth in (20, 32, 44, 56, 110)],
}


@pytest.mark.parametrize("sweep_file", sorted(PAPER_SWEEPS))
def test_paper_sweeps_expand_to_one_run_per_model(sweep_file):
    runs = sweep.expand(sweep_file, "gs://bucket/base/")
    expected = PAPER_SWEEPS[sweep_file]
    assert [(r.name, r.config, r.overrides) for r in runs] == [e[:3] for e in expected]
    assert [r.workdir for r in runs] == [f"gs://bucket/base/{e[0]}" for e in expected]
    assert all(SAFE_NAME.fullmatch(r.name) for r in runs)
    assert sweep.expand(sweep_file, "gs://bucket/base") == runs  # deterministic

    for run, (*_, model) in zip(runs, expected):
        config = effective_config(run)
        assert config.model.name == model
        if sweep_file == "configs/sweep_table2.py":
            assert config.model.shortcut == "A"     # Table 2's ResNets: zero-padding identity
        if sweep_file == "configs/sweep_table3.py":
            assert config.model.shortcut == run.name[-1]
        if "cifar" in run.config:
            depth = int(re.search(r"depth=(\d+)", run.config).group(1))
            assert config.schedule.warmup_until_error == CIFAR_WARMUP[depth]
            assert (config.model.shortcut, config.train.num_steps, config.data.eval_split) == ("A", 64_000, "test")


def test_run_names_are_readable_and_tell_points_apart():
    names = sweep.run_names([
        {"model.name": "plain18", "model.shortcut": "A"},
        {"train.batch_size": 64, "eval.batch_size": 32, "schedule.boundaries_steps": (30, 60)},
        {"config": "configs/cifar.py:depth=56,plain=True", "data.name": "imagefolder:/data/my set"},
        {},
    ])
    # A name field goes by its value alone; "batch_size" ends two fields, which go by their whole
    # dotted names.
    assert names == ["plain18_shortcut-A",
                     "train.batch_size-64_eval.batch_size-32_boundaries_steps-30-60",
                     "cifar_depth-56_plain-True_imagefolder-data-my-set",
                     "base"]
    assert sweep.run_names([{"model.name": "plain18", "model.shortcut": "A"}]) == ["plain18_shortcut-A"]


def test_local_dry_run_prints_the_main_command_of_each_run(tmp_path):
    base = tmp_path / "table6"
    plan = planned("--sweep=configs/sweep_table6.py", f"--workdir={base}", "--config.train.num_steps=10")
    assert [name for name, _, _ in plan] == [name for name, *_ in PAPER_SWEEPS["configs/sweep_table6.py"]]
    for (name, workdir, argv), depth in zip(plan, (20, 32, 44, 56, 110, 1202)):
        assert workdir == f"{base}/{name}"
        assert argv == [PYTHON, "-m", "resnet_jax.main", f"--config=configs/cifar.py:depth={depth}",
                        f"--workdir={workdir}", "--config.train.num_steps=10"]
    assert not base.exists()  # a dry run writes nothing


def remote(step):
    """The remote command of a `gcloud ... ssh --command=...` step."""
    return next(a for a in step if a.startswith("--command="))[len("--command="):]


def test_tpu_mode_launches_each_run_on_all_workers(tmp_path):
    plan = planned("--sweep=configs/sweep_table3.py", "--workdir=gs://bucket/table3", "--mode=tpu",
                   "--tpu=my-pod", "--zone=us-central2-b", "--project=my-project",
                   "--config.data.data_dir=gs://bucket/tfds")
    assert len(plan) == 3
    for index, (name, workdir, argv) in enumerate(plan):
        assert workdir == f"gs://bucket/table3/{name}"
        assert argv[:3] == [PYTHON, "-m", "launch.tpu_pod"]
        assert {"--tpu=my-pod", "--zone=us-central2-b", "--project=my-project", f"--workdir={workdir}",
                "--config=configs/sweep_table3.py", f"--config.model.shortcut={name[-1]}",
                "--config.data.data_dir=gs://bucket/tfds"} <= set(argv)
        assert ("--no-install" in argv) == (index > 0)  # one pod: install once
        assert "--wait" in argv  # runs in turn: each launch waits for its run to end

    # The launcher itself, as the sweep would call it, but as a dry run.
    lines = command(*plan[0][2][2:], "--dry-run").stdout.splitlines()
    steps = [shlex.split(line) for line in lines]
    assert steps[0][:3] == ["git", "-C", str(REPO)] and steps[0][3] == "archive"
    assert steps[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in steps[1]
    install, train = steps[2], steps[3]
    for step in (install, train):
        assert step[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
        assert {"--zone=us-central2-b", "--project=my-project", "--worker=all"} <= set(step)
    # A Python 3.11 environment made by uv on every worker, the project installed there; nothing
    # into the image's own Python (3.10) but uv itself.
    pinned = re.search(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)
    assert remote(install).endswith(
        " && python3 -m pip install --user --quiet --upgrade uv"
        " && python3 -m uv venv --allow-existing --python 3.11 ~/resnet_jax_venv"
        " && python3 -m uv pip install --python ~/resnet_jax_venv/bin/python -r requirements.txt -e ."
        f" 'jax[tpu]=={pinned}'")
    # The main command runs in that environment, detached from the SSH session, and the launch
    # waits for it (--wait).
    words = shlex.split(remote(train))
    inner = shlex.split(words[words.index("-c") + 1])
    assert words[words.index("-c") - 4:words.index("-c")] == ["setsid", "-w", "nohup", "bash"]
    assert inner[:inner.index("&")] == ["~/resnet_jax_venv/bin/python", "-m", "resnet_jax.main",
                                        "--config=configs/sweep_table3.py", "--workdir=gs://bucket/table3/shortcut-A",
                                        "--config.model.shortcut=A", "--config.data.data_dir=gs://bucket/tfds"]
    assert remote(train).endswith('wait "$runner"')

    # Without install, only the training command; with --repo, a clone instead of a copy.
    assert len(command(*plan[1][2][2:], "--dry-run").stdout.splitlines()) == 1
    cloned = command("launch.tpu_pod", "--tpu=p", "--zone=z", "--workdir=gs://b/r", "--config=configs/resnet50.py",
                     "--repo=https://example.org/resnet_jax.git", "--ref=v1", "--dry-run").stdout.splitlines()
    assert len(cloned) == 2 and "git clone https://example.org/resnet_jax.git resnet_jax" in cloned[0]
    assert "git fetch --quiet origin v1 && git checkout --quiet --force --detach FETCH_HEAD" in cloned[0]
    assert "uv venv --allow-existing --python 3.11 ~/resnet_jax_venv" in cloned[0]


def test_the_tpu_python_satisfies_the_projects_requirement():
    requires = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert tuple(map(int, tpu_pod.PYTHON_VERSION.split("."))) >= tuple(map(int, requires.groups()))


# A stand-in for the worker's ~/resnet_jax_venv/bin/python: says what it runs and where, stops
# with 75 on SIGTERM as the main job does after saving, else ends after FAKE_SECONDS with
# FAKE_STATUS.
FAKE_PYTHON = """#!/bin/bash
echo "main $* in $PWD"
trap 'echo "stopped after saving"; exit 75' TERM
for _ in $(seq $((${FAKE_SECONDS:-0} * 10))); do sleep 0.1; done
exit ${FAKE_STATUS:-0}
"""


class Worker:
    """A home directory laid out as the install leaves a worker's, where tpu_pod's start
    command runs as gcloud's ssh would run it (bash -c, from the home directory)."""

    def __init__(self, tmp_path, venv=True):
        self.home = tmp_path / "home"
        (self.home / "resnet_jax").mkdir(parents=True)
        if venv:
            python = self.home / "resnet_jax_venv/bin/python"
            python.parent.mkdir(parents=True)
            python.write_text(FAKE_PYTHON)
            python.chmod(0o755)
        self.pids = []

    def start_command(self, *flags):
        args, overrides = tpu_pod.parse_args(["--tpu=p", "--zone=z", "--workdir=gs://b/r",
                                              "--config=configs/resnet50.py", *flags, "--config.seed=3"])
        return ["bash", "-c", tpu_pod.start_command(args, overrides)]

    def env(self, **variables):
        return {"HOME": str(self.home), "PATH": os.environ["PATH"], **variables}

    def file(self, name, timeout=20):
        """The content of ~/NAME once it is written."""
        path, deadline = self.home / name, time.monotonic() + timeout
        while not (path.exists() and path.read_text().strip()):
            assert time.monotonic() < deadline, f"~/{name} was not written"
            time.sleep(0.05)
        return path.read_text().strip()

    def pid(self):
        pid = int(self.file("resnet_jax.pid"))
        self.pids.append(pid)
        return pid

    def stop_all(self):
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def worker(tmp_path):
    made = Worker(tmp_path)
    yield made
    made.stop_all()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def test_the_tpu_run_is_detached_logged_and_stopped_by_sigterm(worker):
    started = subprocess.run(worker.start_command(), cwd=worker.home, env=worker.env(FAKE_SECONDS="60"),
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip().endswith("started, output in ~/resnet_jax.log")  # it did not wait
    pid = worker.pid()
    assert alive(pid) and os.getsid(pid) != os.getsid(0)  # a session of its own
    assert worker.file("resnet_jax.log") == (f"main -m resnet_jax.main --config=configs/resnet50.py "
                                             f"--workdir=gs://b/r --config.seed=3 in {worker.home}/resnet_jax")

    again = subprocess.run(worker.start_command(), cwd=worker.home, env=worker.env(), capture_output=True,
                           text=True, timeout=30)
    assert again.returncode == 1
    assert f"process {pid} of an earlier launch still runs: stop it first" in again.stderr
    assert alive(pid)

    os.kill(pid, signal.SIGTERM)  # what the stop command of docs/running.md sends
    assert worker.file("resnet_jax.status") == "75"
    assert worker.file("resnet_jax.log").endswith("stopped after saving")


def test_a_dropped_connection_leaves_the_tpu_run_going(worker):
    # The launching shell in a session of its own, as sshd starts it; a dropped connection
    # hangs up that session.
    session = subprocess.Popen(worker.start_command("--wait"), cwd=worker.home, env=worker.env(FAKE_SECONDS="60"),
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = worker.pid()
    os.killpg(session.pid, signal.SIGHUP)
    assert session.wait(timeout=10) == -signal.SIGHUP
    time.sleep(0.5)
    assert alive(pid)
    os.kill(pid, signal.SIGTERM)
    assert worker.file("resnet_jax.status") == "75"


@pytest.mark.parametrize("status", [0, 75, 1])
def test_wait_exits_with_the_tpu_runs_status(worker, status):
    waited = subprocess.run(worker.start_command("--wait"), cwd=worker.home,
                            env=worker.env(FAKE_SECONDS="1", FAKE_STATUS=str(status)), timeout=30)
    assert waited.returncode == status
    assert worker.file("resnet_jax.status") == str(status)


def test_a_worker_without_the_environment_refuses_to_start(tmp_path):
    bare = Worker(tmp_path, venv=False)
    result = subprocess.run(bare.start_command(), cwd=bare.home, env=bare.env(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert "no ~/resnet_jax_venv: launch once without --no-install" in result.stderr
    assert not (bare.home / "resnet_jax.pid").exists()


def test_the_launcher_says_how_to_watch_and_stop_the_run():
    args, _ = tpu_pod.parse_args(["--tpu=p", "--zone=z", "--workdir=gs://b/r", "--config=c.py"])
    watch = tpu_pod.watch_commands(args)
    assert watch["output"][-2:] == ["--worker=0", "--command=tail -n 100 -F ~/resnet_jax.log"]
    assert watch["stop"][-2:] == ["--worker=0", '--command=kill -TERM "$(cat ~/resnet_jax.pid)"']
    assert watch["exit statuses"][-2:] == ["--worker=all", "--command=cat ~/resnet_jax.status"]


def test_tpu_launcher_refuses_a_local_workdir():
    result = command("launch.tpu_pod", "--tpu=p", "--zone=z", f"--workdir={REPO}/runs", "--config=configs/resnet50.py",
                     "--dry-run", check=False)
    assert result.returncode == 2 and "gs://" in result.stderr and result.stdout == ""
    with pytest.raises(SystemExit):
        tpu_pod.parse_args(["--tpu=p", "--zone=z", "--workdir=gs://b", "--config=c.py", "--config.x"])


def fake_tools(tmp_path, **scripts):
    """A bin directory of fake commands, first on PATH."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for tool, script in scripts.items():
        (fake / tool).write_text(f"#!/bin/bash\n{script}\n")
        (fake / tool).chmod(0o755)
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SLURM_", "JAX_LOCAL"))},
            "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO)}


# The fake srun says what the tasks would get: their GPUs and their command.
SRUN = 'echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"; for a in "$@"; do echo "ARG $a"; done'


def test_slurm_mode_submits_the_batch_script_once_per_run(tmp_path):
    plan = planned("--sweep=configs/sweep_fig6.py", "--workdir=/shared/fig6", "--mode=slurm", "--nodes=2",
                   "--gpus_per_node=4", "--sbatch_args=--partition=gpu --time=24:00:00")
    assert len(plan) == 9
    name, workdir, argv = plan[0]
    assert argv == ["sbatch", "--job-name=cifar_depth-20_plain-True", "--partition=gpu", "--time=24:00:00",
                    "--nodes=2", "--gpus-per-node=4", str(REPO / "launch/slurm.sbatch"),
                    "--config=configs/cifar.py:depth=20,plain=True", "--workdir=/shared/fig6/cifar_depth-20_plain-True"]

    # The batch script under a fake srun, on nodes of 4 GPUs: one task per node, given all four
    # (JAX would otherwise take only the GPU of its local rank), and the flags as given.
    env = {**fake_tools(tmp_path, srun=SRUN), "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}
    result = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), *argv[7:], "--config.seed=3"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "JAX_LOCAL_DEVICE_IDS=0,1,2,3"
    assert [l[4:] for l in lines[1:]] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "--cpus-per-task=32",
                                          "python", "-m", "resnet_jax.main", *argv[7:], "--config.seed=3"]
    # No per-process GPU isolation, which would cost NCCL the node's NVLink.
    script = (REPO / "launch/slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1\n" in script and "#SBATCH --gpus-per-node=" in script
    assert "--gpus-per-task" not in script.replace("(what\n# --gpus-per-task=1 gives)", "")


def test_slurm_script_counts_the_gpus_or_refuses_without_any(tmp_path):
    # Where SLURM does not say (an older release), nvidia-smi counts the node's GPUs.
    env = fake_tools(tmp_path, srun=SRUN, **{"nvidia-smi": 'printf "GPU 0: A\\nGPU 1: B\\n"'})
    result = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "--workdir=/w"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "JAX_LOCAL_DEVICE_IDS=0,1"

    env = fake_tools(tmp_path, srun=SRUN, **{"nvidia-smi": "exit 9"})
    result = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "--workdir=/w"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "slurm.sbatch: error: no GPU allocated on this node; submit with --gpus-per-node=G\n"


@pytest.mark.parametrize("status, requeued", [(75, True), (1, False), (0, False)])
def test_slurm_script_requeues_a_preempted_job_only(tmp_path, status, requeued):
    env = {**fake_tools(tmp_path, srun=f"exit {status}", scontrol='echo "scontrol $*"'),
           "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8"}
    result = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "--workdir=/w"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == status  # the job's own status is kept either way
    assert (result.stdout.strip() == "scontrol requeue 4242") == requeued, result.stdout


def write_sweep(tmp_path, points, name="my_sweep.py"):
    path = tmp_path / name
    path.write_text("from configs import quickstart\n\n\ndef get_config(arg=None):\n"
                    "    return quickstart.get_config()\n\n\n"
                    f"def get_sweep():\n    return {points!r}\n")
    return path


@pytest.mark.parametrize("points, extra, message", [
    ([{"seed": 1}, {"model.shortcutt": "B"}], [], "config field 'model.shortcutt' does not exist"),
    ([{"nosuch.depth": 1}], [], "config field 'nosuch' does not exist"),
    ([{"train.num_steps": "many"}], [], "config field 'train.num_steps' cannot be 'many'"),
    ([{"seed": 1}], ["--config.train.num_stepz=3"], "config field 'train.num_stepz' does not exist"),
    ([{"seed": 1}, {"seed": 2}], ["--config.seed=3"], "--config.seed is swept over"),
    ([{"data.name": "a b"}, {"data.name": "a/b"}], [], "both make the run name 'a-b'"),
    ([{"config": "configs/cifar.py:depht=56"}], [], "configs/cifar.py takes depth, plain, shortcut, val"),
])
def test_a_bad_sweep_stops_before_anything_runs(tmp_path, points, extra, message):
    sweep_file = write_sweep(tmp_path, points)
    result = command("launch.sweep", f"--sweep={sweep_file}", f"--workdir={tmp_path}/runs", *extra, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("sweep: error: "), result.stderr
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_local_sweep_trains_each_point_in_its_own_workdir(tmp_path):
    # Two points that compile to the same programs, so the second run takes them from the shared cache.
    sweep_file = write_sweep(tmp_path, [{"seed": 1}, {"seed": 2}])
    short = {**SMALL, "train.num_steps": 2, "eval.every_steps": 2, "checkpoint.every_steps": 2,
             "compilation_cache_dir": str(tmp_path / "cache")}
    own_cache = {k: v for k, v in environment().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    result = subprocess.run([PYTHON, "-m", "launch.sweep", f"--sweep={sweep_file}", f"--workdir={tmp_path}/runs",
                             *(f"--config.{k}={v}" for k, v in short.items())],
                            cwd=REPO, env=own_cache, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "runs")) == ["seed-1", "seed-2"]
    for seed in (1, 2):
        workdir = tmp_path / "runs" / f"seed-{seed}"
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 2 and "eval_accuracy" in rows[-1]
        config = json.loads((workdir / "config.json").read_text())
        assert (config["seed"], config["model"]["name"]) == (seed, "cifar_resnet8")


# Cluster detection (resnet_jax/distributed/sharding.py): the launchers' own variables, public JAX only.
SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "1",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
OPEN_MPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "1",
            "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
GKE_TPU = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
# libtpu installed on a machine that is no Cloud TPU VM: JAX finds no TPU and asks no server.
FAKE_LIBTPU = "def get_library_path():\n    return None\n"
ONE_PROCESS = sharding.ONE_PROCESS


@pytest.fixture
def no_launch(monkeypatch):
    return without_launch_environment(monkeypatch)


@pytest.mark.parametrize("variables, installed, cluster", [
    ({}, (), None),
    (SLURM_STEP, (), "SlurmCluster"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}, (), None),  # sbatch without srun
    (OPEN_MPI, (), "OmpiCluster"),
    ({**OPEN_MPI, **SLURM_STEP}, (), "OmpiCluster"),  # mpirun inside an allocation: JAX takes Open MPI first
    (GKE_TPU, ("libtpu",), "GkeTpuCluster"),
    (GKE_TPU, (), None),  # no libtpu: JAX looks for no TPU launch
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, (), None),  # any pod; JAX needs the kubernetes package
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, ("kubernetes",), "K8sCluster"),
    ({}, ("libtpu",), "GceTpuCluster"),  # perhaps a Cloud TPU VM: JAX asks its metadata server
])
def test_cluster_detection_reads_the_launchers_variables(no_launch, variables, installed, cluster):
    for name, value in variables.items():
        no_launch.setenv(name, value)
    no_launch.setattr(clusters, "_installed", lambda module: module in installed)
    assert clusters.detect_cluster() == cluster


def test_what_jax_does_not_join_is_one_process_or_an_error(no_launch):
    def finds_nothing(*args, **kwargs):
        raise ValueError("coordinator_address should be defined.")  # JAX's, when it finds no launch

    no_launch.setattr(jax.distributed, "initialize", finds_nothing)
    no_launch.setattr(clusters, "_installed", lambda module: module == "libtpu")
    assert sharding.initialize_distributed() == ONE_PROCESS  # libtpu, but no TPU VM answered
    for name, value in SLURM_STEP.items():
        no_launch.setenv(name, value)
    with pytest.raises(ValueError, match="coordinator_address"):  # a launch JAX should have joined
        sharding.initialize_distributed()


def test_no_private_jax_module_finds_the_launch():
    for path in (REPO / "resnet_jax").glob("*.py"):
        source = path.read_text()
        assert "jax._src.clusters" not in source and "_cluster_types" not in source, path
        assert "_src import clusters" not in source, path


@pytest.mark.parametrize("variables, found, launch, processes", [
    ({}, None, ONE_PROCESS, "1 False"),
    (SLURM_STEP, "SlurmCluster", "SLURM", "1 True"),
    (OPEN_MPI, "OmpiCluster", "Open MPI", "1 True"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}, None, ONE_PROCESS, "1 False"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None, ONE_PROCESS, "1 False"),
    ("libtpu", "GceTpuCluster", ONE_PROCESS, "1 False"),  # JAX tried, found no TPU VM: one process
])
def test_jax_joins_the_launch_that_detection_names(tmp_path, variables, found, launch, processes):
    """The real jax.distributed.initialize(), in a fresh process, on one-task launches of each
    kind on localhost: what detection names is what JAX joins, and nothing else starts it."""
    env = {k: v for k, v in environment().items() if not k.startswith(LAUNCH_PREFIXES)}
    if variables == "libtpu":
        (tmp_path / "libtpu").mkdir()
        (tmp_path / "libtpu/__init__.py").write_text(FAKE_LIBTPU)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    else:
        env.update(variables)
    probe = ("from resnet_jax.distributed import clusters, sharding; found = clusters.detect_cluster(); "
             "launch = sharding.initialize_distributed(); import jax; "
             "print(found, '|', launch, '|', jax.process_count(), jax.distributed.is_initialized())")
    result = subprocess.run([PYTHON, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"{found} | {launch} | {processes}"


def _launch_plan(config, *flags):
    result = command("launch.tpu_pod", "--tpu=p", "--zone=z", "--workdir=gs://b/r",
                     f"--config={config}", *flags, "--dry-run")
    return [shlex.split(line) for line in result.stdout.splitlines()], result.stderr


def _trained_config(steps):
    words = shlex.split(remote(steps[-1]))
    inner = shlex.split(words[words.index("-c") + 1])  # the detached shell's command
    return next(word for word in inner if word.startswith("--config="))


def test_a_config_file_that_is_not_committed_travels_to_the_workers(tmp_path):
    # The workers got the committed tree alone and were told to run a path they did not have.
    mine = tmp_path / "my_r101.py"
    mine.write_text("from configs import resnet101\n\n\ndef get_config(arg=None):\n"
                    "    return resnet101.get_config(arg)\n")
    for flags in ((), ("--no-install",)):
        steps, said = _launch_plan(f"{mine}:bn=global", *flags)
        copy = steps[-2]
        assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in copy
        assert copy[5:7] == [str(mine), "p:resnet_jax/launched_config.py"]
        assert _trained_config(steps) == "--config=launched_config.py:bn=global"
        assert f"with the config file {mine} copied as resnet_jax/launched_config.py" in said, said
    # A committed one is in every copy: it stays as it is, and the line names the commit.
    steps, said = _launch_plan("configs/resnet50.py:bn=global")
    assert not any(step[4] == "scp" and "launched_config.py" in " ".join(step) for step in steps)
    assert _trained_config(steps) == "--config=configs/resnet50.py:bn=global"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert f"the workers run commit {commit[:12]} of this checkout" in said, said


def test_a_config_file_that_does_not_exist_is_refused_in_one_line(tmp_path):
    result = command("launch.tpu_pod", "--tpu=p", "--zone=z", "--workdir=gs://b/r",
                     f"--config={tmp_path / 'none.py'}", "--dry-run", check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"tpu_pod: error: --config: {tmp_path / 'none.py'} is not a " \
                                    f"file (here or in {REPO})"
