"""Shared test setup.

torch and torchvision are imported before anything imports TensorFlow: the other order crashes
torchvision on this platform. Matrix products run at full float32 precision so that equivalence
tests compare the networks, not the backends' fast paths. XLA's CPU fusion is set as the main
job sets it (`resnet_jax.cpu`).

Compiling takes most of the suite's time, and many tests compile the same small programs, in
their own processes: all of them share one JAX persistent compilation cache, every program
kept (the main job's own cache is per workdir, `compilation_cache_dir`; the small runs of the
tests set it to "" and so use this one). Set here, before pytest-xdist starts its workers, so
that they and the tests' subprocesses inherit it.
"""

import os
import shutil
import tempfile

import pytest

_MADE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _MADE_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="resnet_jax_tests_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import torch  # noqa: E402, F401  (import order, see above)
import torchvision  # noqa: E402, F401

from resnet_jax import cpu  # noqa: E402

cpu.set_cpu_fusion()  # the tests compile as the main job does

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def xla_compiles():
    """The XLA compilations made while the test runs (their seconds), listed as they happen."""
    seen = []

    def listen(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished small run of the real command (runs.SMALL: steps 1-6, an eval and a checkpoint
    every 3), trained once per test process and shared by the files that need one: a test only
    reads it, or changes a copy of it."""
    import runs  # pylint: disable=import-outside-toplevel  (beside this file)

    workdir = tmp_path_factory.mktemp("finished_run")
    runs.run_main(workdir)
    return workdir


def pytest_sessionfinish(session):
    if _MADE_CACHE and not hasattr(session.config, "workerinput"):  # the process that made it
        shutil.rmtree(_MADE_CACHE, ignore_errors=True)
