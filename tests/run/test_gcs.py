"""The main job on a gs:// workdir, served by a GCS emulator on localhost (tests/gcs_emulator.py):
killed, resumed from the bucket, nothing written on the local disk."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from resnet_jax.run import jsonl
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from runs import REPO, SMALL

pytestmark = pytest.mark.slow  # every test here takes seconds: none is in the fast tier

RUN = {**SMALL, "train.num_steps": 40, "checkpoint.every_steps": 5, "eval.every_steps": 20,
       "log_every_steps": 10, "tensorboard_dir": "",  # TensorFlow's gs:// cannot reach an emulator
       "compilation_cache_dir": "{workdir}/compilation_cache"}  # the default: in the bucket


def command(workdir):
    return [sys.executable, "-m", "resnet_jax.main", f"--config={REPO}/configs/quickstart.py",
            f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in RUN.items()]]


def environment(bucket):
    # Started elsewhere than the repository: every file it wrote locally would show there. Not
    # the tests' shared compilation cache (conftest.py): the run's own, in the bucket.
    return {**{k: v for k, v in bucket.env.items() if k != "JAX_COMPILATION_CACHE_DIR"},
            "PYTHONPATH": str(REPO)}


def committed_steps(bucket):
    return sorted(int(name.split("/")[2]) for name in bucket.objects("run/checkpoints/")
                  if name.endswith("/commit_success.txt"))


def test_a_run_on_a_bucket_is_killed_and_resumes_from_it_writing_nothing_local(gcs_bucket, tmp_path):
    workdir = f"{gcs_bucket.url}/run"
    process = subprocess.Popen(command(workdir), cwd=tmp_path, env=environment(gcs_bucket),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        # Killed once a second checkpoint is committed: the first is then complete on every count
        # (a save waits for the one before it to finish).
        while len(committed_steps(gcs_bucket)) < 2:
            assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    committed = committed_steps(gcs_bucket)
    assert max(committed) < 40

    result = subprocess.run(command(workdir), cwd=tmp_path, env=environment(gcs_bucket),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = [line for line in result.stderr.splitlines() if "Restored the checkpoint" in line]
    assert restored and any(f"step {step} " in restored[0] for step in committed[-2:]), [
        line for line in result.stderr.splitlines() if "checkpoint" in line.lower()][:20]
    assert max(committed_steps(gcs_bucket)) == 40
    objects = gcs_bucket.objects("run/")
    assert {"run/config.json", "run/metrics.jsonl"} <= objects.keys()
    assert any(name.startswith("run/compilation_cache/") for name in objects)
    assert json.loads(gcs_bucket.read("run/config.json"))["train"]["num_steps"] == 40
    steps = [row["step"] for row in jsonl.read_rows(workdir) if "train_loss" in row]
    assert steps == [10, 20, 30, 40]  # the rows the killed run wrote after its checkpoint, once
    assert list(tmp_path.iterdir()) == [] and not (REPO / "gs:").exists()


def test_a_missing_bucket_is_refused_in_one_line(gcs_bucket, tmp_path):
    result = subprocess.run(command("gs://no-such-bucket-here/run"), cwd=tmp_path,
                            env=environment(gcs_bucket), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet_jax: error:") and "'gs://no-such-bucket-here' does not exist" in last
    assert list(tmp_path.iterdir()) == []
    assert os.listdir(REPO).count("gs:") == 0
