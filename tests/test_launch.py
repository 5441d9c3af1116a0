"""Launchers: sweep expansion of the paper's sweeps, the commands of each mode, bad sweeps, a real
local sweep. Nothing here reaches a cloud or a cluster: gcloud and srun only ever run as dry runs
or fakes."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from launch import sweep, tpu_pod
from runs import REPO, SMALL, environment

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
        (f"name-{model}", "configs/sweep_table2.py", (("model.name", model),), model)
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
    # "name" ends two fields here, so both go by their whole dotted names.
    assert names == ["model.name-plain18_shortcut-A",
                     "train.batch_size-64_eval.batch_size-32_boundaries_steps-30-60",
                     "cifar_depth-56_plain-True_data.name-imagefolder-data-my-set",
                     "base"]
    assert sweep.run_names([{"model.name": "plain18", "model.shortcut": "A"}]) == ["name-plain18_shortcut-A"]


def test_local_dry_run_prints_the_main_command_of_each_run(tmp_path):
    base = tmp_path / "table6"
    plan = planned("--sweep=configs/sweep_table6.py", f"--workdir={base}", "--config.train.num_steps=10")
    assert [name for name, _, _ in plan] == [name for name, *_ in PAPER_SWEEPS["configs/sweep_table6.py"]]
    for (name, workdir, argv), depth in zip(plan, (20, 32, 44, 56, 110, 1202)):
        assert workdir == f"{base}/{name}"
        assert argv == [PYTHON, "-m", "resnet_jax.main", f"--config=configs/cifar.py:depth={depth}",
                        f"--workdir={workdir}", "--config.train.num_steps=10"]
    assert not base.exists()  # a dry run writes nothing


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

    # The launcher itself, as the sweep would call it, but as a dry run.
    lines = command(*plan[0][2][2:], "--dry-run").stdout.splitlines()
    steps = [shlex.split(line) for line in lines]
    assert steps[0][:3] == ["git", "-C", str(REPO)] and steps[0][3] == "archive"
    assert steps[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in steps[1]
    install, train = steps[2], steps[3]
    for step in (install, train):
        assert step[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
        assert {"--zone=us-central2-b", "--project=my-project", "--worker=all"} <= set(step)
    remote_install = next(a for a in install if a.startswith("--command="))[len("--command="):]
    assert "pip install -r requirements.txt -e . 'jax[tpu]==" in remote_install
    remote = shlex.split(next(a for a in train if a.startswith("--command="))[len("--command="):])
    assert remote == ["cd", "resnet_jax", "&&", "python3", "-m", "resnet_jax.main",
                      "--config=configs/sweep_table3.py", "--workdir=gs://bucket/table3/shortcut-A",
                      "--config.model.shortcut=A", "--config.data.data_dir=gs://bucket/tfds"]

    # Without install, only the training command; with --repo, a clone instead of a copy.
    assert len(command(*plan[1][2][2:], "--dry-run").stdout.splitlines()) == 1
    cloned = command("launch.tpu_pod", "--tpu=p", "--zone=z", "--workdir=gs://b/r", "--config=configs/resnet50.py",
                     "--repo=https://example.org/resnet_jax.git", "--ref=v1", "--dry-run").stdout.splitlines()
    assert len(cloned) == 2 and "git clone https://example.org/resnet_jax.git resnet_jax" in cloned[0]
    assert "git fetch --quiet origin v1 && git checkout --quiet --force --detach FETCH_HEAD" in cloned[0]


def test_tpu_launcher_refuses_a_local_workdir():
    result = command("launch.tpu_pod", "--tpu=p", "--zone=z", f"--workdir={REPO}/runs", "--config=configs/resnet50.py",
                     "--dry-run", check=False)
    assert result.returncode == 2 and "gs://" in result.stderr and result.stdout == ""
    with pytest.raises(SystemExit):
        tpu_pod.parse_args(["--tpu=p", "--zone=z", "--workdir=gs://b", "--config=c.py", "--config.x"])


def test_slurm_mode_submits_the_batch_script_once_per_run(tmp_path):
    plan = planned("--sweep=configs/sweep_fig6.py", "--workdir=/shared/fig6", "--mode=slurm", "--nodes=2",
                   "--gpus_per_node=4", "--sbatch_args=--partition=gpu --time=24:00:00")
    assert len(plan) == 9
    name, workdir, argv = plan[0]
    assert argv == ["sbatch", "--job-name=cifar_depth-20_plain-True", "--partition=gpu", "--time=24:00:00",
                    "--nodes=2", "--ntasks-per-node=4", str(REPO / "launch/slurm.sbatch"),
                    "--config=configs/cifar.py:depth=20,plain=True", "--workdir=/shared/fig6/cifar_depth-20_plain-True"]

    # The batch script under a fake srun: one GPU per task, and the main command gets the flags as given.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"\n'
                               'for a in "$@"; do echo "ARG $a"; done\n')
    (fake / "srun").chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHON"}, "PATH": f"{fake}:{os.environ['PATH']}",
           "SLURM_SUBMIT_DIR": str(REPO)}
    result = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), *argv[7:], "--config.seed=3"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "JAX_LOCAL_DEVICE_IDS=0"
    assert [l[4:] for l in lines[1:]] == ["--kill-on-bad-exit=1", "python", "-m", "resnet_jax.main", *argv[7:],
                                          "--config.seed=3"]
    script = (REPO / "launch/slurm.sbatch").read_text()
    assert "#SBATCH --gpus-per-task=1" in script and "#SBATCH --ntasks-per-node=" in script


@pytest.mark.parametrize("status, requeued", [(75, True), (1, False), (0, False)])
def test_slurm_script_requeues_a_preempted_job_only(tmp_path, status, requeued):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f"#!/bin/bash\nexit {status}\n")
    (fake / "scontrol").write_text('#!/bin/bash\necho "scontrol $*"\n')
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_ID": "4242"}
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
    ([{"data.name": "a b"}, {"data.name": "a/b"}], [], "both make the run name 'name-a-b'"),
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
