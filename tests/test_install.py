"""The package installed with `pip install .` (not editable) into a fresh virtual environment and
used from another directory: shipped configs by name, a user's config built on the defaults, the
sweep launcher, `--help`. The environment sees this machine's packages (jax, flax, ...) so that
nothing is downloaded; the project's own modules come from the environment's copy."""

import ast
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The JAX APIs that releases after the tested 0.10.2 deprecate or remove, up to the newest
# pyproject.toml allows (their `_deprecations` tables and changelogs), with what replaces them.
# Python >= 3.12 installs the newest jax, where they warn or fail; on 0.10.2 they work silently.
NEWER_JAX_DEPRECATES = {
    "jax.sharding.SingleDeviceSharding": "jax.sharding.make_single_device_sharding",
    "jax.device_put_replicated": "jax.device_put", "jax.device_put_sharded": "jax.device_put",
    "jax.experimental.pjit.pjit": "jax.jit",
    "jax.experimental.shard_map.shard_map": "jax.shard_map",
    "jax.lax.psend": "(none)", "jax.lax.precv": "(none)",
    "jax.scipy.special.bessel_jn": "jax.scipy.special.jn",
    "jax.scipy.special.lpmn": "(none)", "jax.scipy.special.lpmn_values": "(none)",
}
# All that jax.core keeps in the newest jax (the rest moved to jax.extend.core or jax.errors),
# and a module none of whose names lasts.
JAX_CORE_KEEPS = {"AbstractValue", "Atom", "ParamDict", "ShapedArray", "Trace", "Tracer", "Value",
                  "ensure_compile_time_eval", "eval_context", "eval_jaxpr", "max_dim", "min_dim"}
GONE_MODULES = {"jax.interpreters.pxla": "jax.sharding, jax.shard_map, jax.set_mesh"}


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


@pytest.mark.slow
def test_the_installed_copy_is_what_runs(python, tmp_path):
    done = _run(python, tmp_path, "-c", "import configs, launch, resnet_jax\n"
                "print(resnet_jax.__file__, configs.__file__, launch.__file__)")
    assert done.returncode == 0, done.stderr
    assert all("site-packages" in path and not path.startswith(ROOT)
               for path in done.stdout.split()), done.stdout


@pytest.mark.slow
def test_help_lists_every_field_with_its_value_and_comment(python, tmp_path):
    done = _run(python, tmp_path, "-m", "resnet_jax.main", "--config=cifar:depth=110", "--help")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert _shows(lines, "  name = 'cifar_resnet110'") and _shows(lines, "  warmup_until_error = 0.8")
    # The line about a field is its comment in configs/default.py.
    assert any(line.startswith("  on_device = False") and "device memory" in line for line in lines)
    assert "model:" in lines and "schedule:" in lines and "--workdir" in done.stdout
    assert "quickstart" in next(line for line in lines if line.startswith("Shipped configs"))


@pytest.mark.slow
def test_a_users_config_builds_on_the_shipped_ones(python, tmp_path):
    (tmp_path / "mine.py").write_text("from configs import quickstart\n\n\ndef get_config():\n"
                                      "    config = quickstart.get_config()\n"
                                      "    config.train.num_steps = 7\n    return config\n")
    done = _run(python, tmp_path, "-m", "resnet_jax.main", "--config=mine.py", "--help")
    assert done.returncode == 0, done.stderr
    assert _shows(done.stdout.splitlines(), "  num_steps = 7")


@pytest.mark.slow
def test_a_shipped_config_trains_by_name_from_another_directory(python, tmp_path):
    done = _run(python, tmp_path, "-m", "resnet_jax.main", "--config=quickstart",
                f"--workdir={tmp_path / 'run'}", "--config.train.num_steps=2",
                "--config.eval.every_steps=2", "--config.checkpoint.every_steps=2", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("eval_accuracy") == 1


@pytest.mark.slow
def test_an_unknown_config_name_is_one_line(python, tmp_path):
    done = _run(python, tmp_path, "-m", "resnet_jax.main", "--config=resnet51",
                f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 2
    message = done.stderr.strip()
    assert "\n" not in message and "'resnet51'" in message and "resnet50" in message, message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_sweep_launcher_runs_installed(python, tmp_path):
    done = _run(python, tmp_path, "-m", "launch.sweep", "--sweep=configs/sweep_table6.py",
                f"--workdir={tmp_path / 'sweep'}", "--dry-run")
    assert done.returncode == 0, done.stderr
    runs = done.stdout.splitlines()
    assert runs and all("python -m resnet_jax.main --config=" in run for run in runs), runs


def _jax_names(tree: ast.Module):
    """(line, dotted name) of every jax name a module uses, through its imports' aliases."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for name in node.names:
                if name.name.split(".")[0] == "jax":
                    aliases[name.asname or "jax"] = name.name if name.asname else "jax"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (
                node.module or "").split(".")[0] == "jax":
            for name in node.names:
                aliases[name.asname or name.name] = f"{node.module}.{name.name}"
                yield node.lineno, f"{node.module}.{name.name}"
    for node in ast.walk(tree):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.insert(0, node.attr)
            node = node.value
        if parts and isinstance(node, ast.Name) and node.id in aliases:
            yield node.lineno, ".".join([aliases[node.id], *parts])


def _replacement(name: str) -> str | None:
    if name in NEWER_JAX_DEPRECATES:
        return NEWER_JAX_DEPRECATES[name]
    module, _, last = name.rpartition(".")
    if module == "jax.core" and last not in JAX_CORE_KEEPS:
        return "jax.extend.core or jax.errors"
    return next((new for old, new in GONE_MODULES.items() if name.startswith(old + ".")), None)


def test_no_jax_api_that_newer_releases_deprecate():
    found = []
    for folder in ("resnet_jax", "benchmarks", "configs", "launch", "tests"):
        for path in sorted(pathlib.Path(ROOT, folder).rglob("*.py")):
            for line, name in _jax_names(ast.parse(path.read_text())):
                new = _replacement(name)
                if new:
                    found.append(f"{path.relative_to(ROOT)}:{line} {name} -> {new}")
    assert not found, "\n".join(sorted(set(found)))


def test_the_deprecation_check_sees_through_imports():
    tree = ast.parse("import jax\nfrom jax import sharding as s\nfrom jax.core import Tracer\n"
                     "import jax.interpreters.pxla as pxla\na = s.SingleDeviceSharding\n"
                     "b = jax.core.get_aval\nc = pxla.thread_resources\n")
    flagged = {name for _, name in _jax_names(tree) if _replacement(name)}
    assert flagged == {"jax.sharding.SingleDeviceSharding", "jax.core.get_aval",
                       "jax.interpreters.pxla.thread_resources"}, flagged


def test_jax_and_its_libraries_are_capped_above_what_was_tested():
    # A release past the tested ones is not installed unseen; CI's pins lie inside the ranges.
    from packaging.requirements import Requirement
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    ranges = {r.name: r.specifier for r in map(Requirement, dependencies)}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line)
    for name in ("jax", "flax", "optax", "orbax-checkpoint"):
        assert any(spec.operator == "<" for spec in ranges[name]), (name, ranges[name])
        assert pins[name] in ranges[name], (name, pins[name], ranges[name])
