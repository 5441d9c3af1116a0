"""The package installed with `pip install .` (not editable) into a fresh virtual environment and
used from another directory: shipped configs by name, a user's config built on the defaults, the
sweep launcher, `--help`. The environment sees this machine's packages (jax, flax, ...) so that
nothing is downloaded; the project's own modules come from the environment's copy."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def python(tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    executable = str(venv / "bin" / "python")
    subprocess.run([executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    ROOT], check=True, capture_output=True, timeout=600)
    return executable


def _run(python, cwd, *arguments, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, *arguments], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _shows(lines: list[str], field: str) -> bool:
    """Whether --help shows `field` ("  name = value"), with or without a comment after it."""
    return any(line == field or line.startswith(field + " ") for line in lines)


def test_the_installed_copy_is_what_runs(python, tmp_path):
    done = _run(python, tmp_path, "-c", "import configs, launch, resnet_jax\n"
                "print(resnet_jax.__file__, configs.__file__, launch.__file__)")
    assert done.returncode == 0, done.stderr
    assert all("site-packages" in path and not path.startswith(ROOT)
               for path in done.stdout.split()), done.stdout


def test_help_lists_every_field_with_its_value_and_comment(python, tmp_path):
    done = _run(python, tmp_path, "-m", "resnet_jax.main", "--config=cifar:depth=110", "--help")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert _shows(lines, "  name = 'cifar_resnet110'") and _shows(lines, "  warmup_until_error = 0.8")
    # The line about a field is its comment in configs/default.py.
    assert any(line.startswith("  on_device = False") and "device memory" in line for line in lines)
    assert "model:" in lines and "schedule:" in lines and "--workdir" in done.stdout
    assert "quickstart" in next(line for line in lines if line.startswith("Shipped configs"))


def test_a_users_config_builds_on_the_shipped_ones(python, tmp_path):
    (tmp_path / "mine.py").write_text("from configs import quickstart\n\n\ndef get_config():\n"
                                      "    config = quickstart.get_config()\n"
                                      "    config.train.num_steps = 7\n    return config\n")
    done = _run(python, tmp_path, "-m", "resnet_jax.main", "--config=mine.py", "--help")
    assert done.returncode == 0, done.stderr
    assert _shows(done.stdout.splitlines(), "  num_steps = 7")


def test_a_shipped_config_trains_by_name_from_another_directory(python, tmp_path):
    done = _run(python, tmp_path, "-m", "resnet_jax.main", "--config=quickstart",
                f"--workdir={tmp_path / 'run'}", "--config.train.num_steps=2",
                "--config.eval.every_steps=2", "--config.checkpoint.every_steps=2", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("eval_accuracy") == 1


def test_an_unknown_config_name_is_one_line(python, tmp_path):
    done = _run(python, tmp_path, "-m", "resnet_jax.main", "--config=resnet51",
                f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 2
    message = done.stderr.strip()
    assert "\n" not in message and "'resnet51'" in message and "resnet50" in message, message
    assert not (tmp_path / "run").exists()


def test_the_sweep_launcher_runs_installed(python, tmp_path):
    done = _run(python, tmp_path, "-m", "launch.sweep", "--sweep=configs/sweep_table6.py",
                f"--workdir={tmp_path / 'sweep'}", "--dry-run")
    assert done.returncode == 0, done.stderr
    runs = done.stdout.splitlines()
    assert runs and all("python -m resnet_jax.main --config=" in run for run in runs), runs
