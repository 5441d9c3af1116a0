"""benchmarks/gpu_check.py at tiny sizes on the CPU, as the GPU machine would run it: without
TensorFlow, TFDS or gcsfs, which that machine lacks (blocked in every process it starts); and its
one-line refusal when a piece it needs is missing."""

import json
import os
import platform
import subprocess
import sys

import pytest

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT = ("tensorflow", "tensorflow_datasets", "gcsfs")


def _dry_run(tmp_path, *arguments: str, absent: tuple[str, ...] = ABSENT
             ) -> tuple[subprocess.CompletedProcess, list[dict]]:
    # A module set to None in sys.modules is one Python cannot find: `import` raises
    # ModuleNotFoundError and importlib.util.find_spec returns None, as where it is not installed.
    # sitecustomize runs at the start of this process and of each one it starts (pytest, torch).
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {absent!r}:\n    sys.modules[name] = None\n")
    out = tmp_path / "check.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(site), ROOT, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run",
                           "--out", str(out), *arguments],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return done, lines


@pytest.mark.slow
def test_dry_run_runs_every_part_without_tensorflow(tmp_path):
    done, lines = _dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    by_what = {}
    for line in lines:
        by_what.setdefault(line["what"], []).append(line)
    assert by_what["summary"][0]["passed"] == list(gpu_check.PARTS), lines
    # The first line says what it ran on; this environment is the tested one.
    versions = lines[0]
    assert versions["what"] == "versions" and versions["python"] == platform.python_version()
    assert all(versions["packages"][name] for name in gpu_check.REPORTED), versions
    assert versions["untested"] == [] and versions["platform"] == "cpu"
    assert versions["devices"] and set(versions["devices"]) == {"cpu"}
    tests = by_what["tests"][0]
    assert tests["passed"] >= len(gpu_check.DRY_RUN_TESTS) and tests["failed"] == []
    jax_step, torch_step = by_what["train_step"]
    assert jax_step["framework"] == "jax" and torch_step["framework"] == "torch"
    for step in (jax_step, torch_step):
        assert step["images_per_second"] > 0 and step["batch_size"] == 8
    assert jax_step["compile_seconds"] > 0 and jax_step["macs_per_image"] > 0
    # The two frameworks train the same network: torchvision's ResNet-18 has our parameter count.
    assert jax_step["params"] == 11_689_512
    assert by_what["train_step_ratio"][0]["jax_over_torch"] > 0
    cifar = by_what["cifar"][0]
    assert cifar["on_device"] and cifar["steps_done"] == cifar["steps"] == 3
    assert 0 <= cifar["test_error_percent"] <= 100 and not cifar["stopped_by_time_guard"]
    assert all(line["device_kind"] == "cpu" for line in lines)


@pytest.mark.slow
def test_time_guard_stops_the_cifar_run_as_a_preemption(tmp_path):
    # Part cifar needs 60 s left to start (start-up takes 5-30 s on a busy 2-core machine); the
    # guard asks the run to stop 20 s before the limit.
    done, lines = _dry_run(tmp_path, "--skip", "tests,jax_step,torch_step",
                           "--cifar-steps", "100000", "--time-limit", "95")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cifar = next((line for line in lines if line["what"] == "cifar"), None)
    assert cifar is not None, lines  # not skipped by the guard
    assert cifar["stopped_by_time_guard"] and 0 < cifar["steps_done"] < 100_000
    assert cifar["test_error_percent"] is not None
    summary = lines[-1]
    assert summary["what"] == "summary" and summary["passed"] == ["cifar"]
    assert set(summary["skipped"]) == {"tests", "jax_step", "torch_step"}


@pytest.mark.parametrize("argv, words", [
    (["--skip", "bench"], ["--skip", "'bench'", "tests, jax_step, torch_step, cifar"]),
    (["--time-limit", "0"], ["--time-limit", "positive"]),
    (["--cifar-steps", "0"], ["--cifar-steps", "positive"])])
def test_bad_arguments_are_one_line(argv, words):
    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(argv)
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message


def _pin(distribution: str) -> str:
    return next(pin for pin in gpu_check.carried_requirements()
                if pin.startswith(distribution + "=="))


@pytest.mark.parametrize("module, words", [
    ("clu", ["'clu'", _pin("clu"), "gpu_carry.sh"]),
    ("orbax.checkpoint", ["'orbax.checkpoint'", _pin("orbax-checkpoint")]),
    ("torch", ["'torch'", "wheel of torch for Python"])])
def test_a_missing_module_is_one_line_naming_the_wheel_to_carry(tmp_path, module, words):
    done, lines = _dry_run(tmp_path, absent=(*ABSENT, module))
    message = done.stderr.strip()
    assert done.returncode == 2 and lines == [], done.stdout[-3000:] + done.stderr[-3000:]
    assert "\n" not in message and message.startswith("error: module "), message
    assert all(word in message for word in words), message


def test_a_carried_distribution_at_another_version_is_one_line(tmp_path):
    # An optax of another version first on the path, as the image's would be where the carried
    # wheels were not installed in front of it.
    info = tmp_path / "site" / "optax-9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: optax\nVersion: 9.9\n")
    done, lines = _dry_run(tmp_path)
    message = done.stderr.strip()
    assert done.returncode == 2 and lines == [], done.stdout[-3000:] + done.stderr[-3000:]
    assert "\n" not in message and "optax is 9.9" in message, message
    assert f"not the carried {_pin('optax').split('==')[1]}" in message, message


@pytest.mark.slow
def test_a_module_that_fails_to_import_is_one_line(tmp_path):
    # A clu first on the path that fails as flax 0.12.8 does on jax 0.11 (found, but broken).
    package = tmp_path / "site" / "clu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise AttributeError(\"module 'jax.experimental.hijax' has no attribute "
        "'HiPrimitive'\")\n")
    done, lines = _dry_run(tmp_path)
    message = done.stderr.strip()
    assert done.returncode == 2 and lines == [], done.stdout[-3000:] + done.stderr[-3000:]
    assert "\n" not in message and message.startswith("error: module 'clu' "), message
    assert "does not import with jax" in message and "HiPrimitive" in message, message
