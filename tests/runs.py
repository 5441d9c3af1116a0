"""Helpers for tests that run the main job: a small quickstart, the real command, checkpoints."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from configs import quickstart
from resnet_jax.run import checkpoint, jsonl, validate
from resnet_jax.training import metrics

REPO = Path(__file__).resolve().parents[1]

# A small quickstart: the smallest CIFAR net on the 8x8 digits, a few steps; compiled programs
# in the tests' shared cache (conftest.py).
SMALL = {"model.name": "cifar_resnet8", "data.image_size": 8, "train.batch_size": 32,
         "train.num_steps": 6, "eval.every_steps": 3, "eval.batch_size": 64,
         "checkpoint.every_steps": 3, "log_every_steps": 1, "compilation_cache_dir": ""}


def small_config(**changes):
    config = quickstart.get_config()
    for key, value in {**SMALL, **changes}.items():
        section, _, field = key.rpartition(".")
        setattr(config[section] if section else config, field, value)
    return config


def main_command(workdir, *flags, **changes):
    """The real command, with the SMALL overrides and `changes`."""
    overrides = [f"--config.{k}={v}" for k, v in {**SMALL, **changes}.items()]
    return [sys.executable, "-m", "resnet_jax.main", "--config=configs/quickstart.py",
            f"--workdir={workdir}", *overrides, *flags]


def environment(devices: int | None = None, **variables: str) -> dict[str, str]:
    """os.environ for a subprocess, on `devices` simulated CPU devices (else one), with
    `variables`."""
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
             if "force_host_platform_device_count" not in flag]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**os.environ, "XLA_FLAGS": " ".join(flags), **variables}


# What launchers (SLURM, Open MPI, Cloud TPU, Kubernetes, JAX's own flags) set in the environment.
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JOBSET_", "JAX_COORDINATOR",
                   "JAX_LOCAL_DEVICE_IDS", "JAX_PROCESS")


def without_launch_environment(monkeypatch):
    """`monkeypatch` with every launcher's variable removed from os.environ for the test."""
    for name in list(os.environ):
        if name.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


def run_main(workdir, *flags, devices=None, **changes):
    """The real command in a subprocess on `devices` simulated CPU devices; it must succeed."""
    command = main_command(workdir, *flags, **changes)
    result = subprocess.run(command, cwd=REPO, env=environment(devices),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def latest_params(workdir):
    step, state = checkpoint.read_latest(str(workdir))
    return step, state["params"]


def assert_trees_close(a, b, **tolerance):
    flat_a, flat_b = (validate.dotted(t) for t in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_allclose(flat_a[key], flat_b[key], err_msg=key, **tolerance)


def rows_without_speed(workdir):
    return [{k: v for k, v in row.items() if k not in metrics.SPEED}
            for row in jsonl.read_rows(workdir)]


def free_port() -> int:
    """A TCP port free on localhost now: a multi-process run's coordinator address."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
