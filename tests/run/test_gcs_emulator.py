"""The clients a gs:// workdir goes through, against a GCS emulator on localhost (gcs_emulator.py).

etils.epath (through gcsfs), orbax-checkpoint (tensorstore for the arrays, google-cloud-storage to
list steps) and JAX's persistent compilation cache, in this process and in a fresh one; and what
a missing bucket or a scheme that nothing serves raises.
"""

import contextlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]


def test_epath_files(gcs_bucket):
    run = epath.Path(gcs_bucket.url) / "run"
    run.mkdir(parents=True, exist_ok=True)
    assert gcs_bucket.objects() == {}  # no directories in an object store: mkdir writes nothing
    assert not run.exists()

    (run / "config.json").write_text('{"a": 1}')
    (run / "sub" / "metrics.jsonl").write_text("row\n")
    assert gcs_bucket.objects() == {"run/config.json": 8, "run/sub/metrics.jsonl": 4}
    assert gcs_bucket.read("run/config.json") == b'{"a": 1}'
    assert (run / "config.json").read_text() == '{"a": 1}'
    assert run.exists() and run.is_dir() and (run / "config.json").is_file()
    assert sorted(str(p) for p in run.glob("*.json")) == [f"{gcs_bucket.url}/run/config.json"]
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "sub"]
    with pytest.raises(NotImplementedError, match="Recursive"):
        list(run.glob("**/*.jsonl"))  # epath refuses `**` on object stores

    # rename: a copy and a delete (gcsfs tries GCS's moveTo first; the emulator answers 400)
    (run / "config.json").rename(run / "lock")
    assert gcs_bucket.objects("run/") == {"run/lock": 8, "run/sub/metrics.jsonl": 4}
    (run / "new").write_text("x")
    with pytest.raises(FileExistsError):
        (run / "new").rename(run / "lock")  # epath checks; replace overwrites
    (run / "new").replace(run / "lock")
    assert gcs_bucket.read("run/lock") == b"x" and not (run / "new").exists()

    (run / "lock").unlink()
    assert not (run / "lock").exists()
    with pytest.raises(FileNotFoundError):
        (run / "lock").unlink()
    (run / "lock").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (run / "lock").read_text()

    with pytest.warns(UserWarning, match="Append mode"):  # gcsfs cannot append: it overwrites
        with (run / "sub" / "metrics.jsonl").open("a") as f:
            f.write("more\n")
    assert gcs_bucket.read("run/sub/metrics.jsonl") == b"more\n"

    run.rmtree()
    assert gcs_bucket.objects() == {}


def _checkpoint_manager(directory, **options):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, enable_async_checkpointing=True,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy([checkpoint_managers.LatestN(2)]),
        **options)
    return ocp.CheckpointManager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())


def _state(step):
    return {"params": {"w": jnp.arange(12.0).reshape(3, 4) + step, "b": jnp.full(5, step, jnp.int32)},
            "step": jnp.asarray(step)}


def test_orbax_checkpoints(gcs_bucket):
    import orbax.checkpoint as ocp
    directory = f"{gcs_bucket.url}/run/checkpoints"
    manager = _checkpoint_manager(directory)
    for step in (1, 2, 3):
        manager.save(step, args=ocp.args.StandardSave(_state(step)))
    manager.wait_until_finished()
    manager.check_for_errors()
    assert manager.all_steps() == [2, 3]  # LatestN(2) deleted step 1 from the bucket
    manager.close()

    names = gcs_bucket.objects()
    assert {name.split("/")[2] for name in names} == {"2", "3"}
    for step in (2, 3):  # on GCS orbax writes in place and marks a finished step with a file
        assert f"run/checkpoints/{step}/commit_success.txt" in names
        assert f"run/checkpoints/{step}/_CHECKPOINT_METADATA" in names
        assert any(n.startswith(f"run/checkpoints/{step}/default/ocdbt.process_0/d/") for n in names)

    reader = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler(),
                                   options=ocp.CheckpointManagerOptions(read_only=True))
    assert reader.latest_step() == 3
    restored = reader.restore(3, args=ocp.args.StandardRestore(_state(0)))
    jax.tree.map(np.testing.assert_array_equal, restored, _state(3))


@pytest.fixture
def compilation_cache(gcs_bucket):
    """JAX's persistent compilation cache in the bucket for the test; as it was after."""
    from jax._src import compilation_cache as cc
    names = ["jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs"]
    saved = {name: getattr(jax.config, name) for name in names}
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", f"{gcs_bucket.url}/cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield f"{gcs_bucket.url}/cache"
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


def test_compilation_cache(gcs_bucket, compilation_cache):
    from jax._src import monitoring
    hits = []

    def listener(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    def f(x):
        return jnp.tanh(x) * 3.0 - 0.25

    x = jnp.arange(7.0)
    expected = jax.jit(f)(x)
    entries = [n for n in gcs_bucket.objects("cache/") if n.startswith("cache/jit_f-")]
    assert len(entries) == 1 and entries[0].endswith("-cache"), gcs_bucket.objects()

    jax.clear_caches()  # the next call compiles again: read from the bucket
    monitoring.register_event_listener(listener)
    try:
        np.testing.assert_array_equal(jax.jit(f)(x), expected)
    finally:
        monitoring.unregister_event_listener(listener)
    assert hits


# What the main job does, in a fresh process that gets only the environment.
_SUBPROCESS = textwrap.dedent("""
    import json, os, sys, time
    start = time.monotonic()
    import jax, jax.numpy as jnp, numpy as np
    import orbax.checkpoint as ocp
    from etils import epath
    sys.path[:0] = [sys.argv[2], os.path.dirname(sys.argv[2])]  # this file, and tests/ above it
    from test_gcs_emulator import _checkpoint_manager, _state
    bucket = sys.argv[1]
    jax.config.update("jax_compilation_cache_dir", bucket + "/cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    run = epath.Path(bucket) / "run"
    (run / "config.json").write_text("{}")
    manager = _checkpoint_manager(str(run / "checkpoints"))
    manager.save(4, args=ocp.args.StandardSave(_state(4)))
    manager.wait_until_finished()
    manager.check_for_errors()
    restored = manager.restore(4, args=ocp.args.StandardRestore(_state(0)))
    jax.tree.map(np.testing.assert_array_equal, restored, _state(4))
    print(json.dumps({"backend": type(run._backend).__name__, "seconds": time.monotonic() - start}))
""")


def test_fresh_process(gcs_bucket):
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS, gcs_bucket.url, str(Path(__file__).parent)],
                            cwd=REPO, env=gcs_bucket.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])["backend"] == "_FileSystemSpecBackend"
    names = gcs_bucket.objects()
    assert "run/config.json" in names and "run/checkpoints/4/commit_success.txt" in names
    assert any(n.startswith("cache/jit_") for n in names), names


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's failed threads
def test_missing_bucket(gcs_bucket):
    import orbax.checkpoint as ocp
    missing = epath.Path("gs://no-such-bucket-here")
    start = time.monotonic()
    assert not missing.exists()  # the bucket's root: how to tell a missing bucket up front
    assert epath.Path(gcs_bucket.url).exists()
    assert not (missing / "run").exists()
    (missing / "run").mkdir(parents=True, exist_ok=True)  # a no-op: no error either
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        (missing / "run" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        list((missing / "run").iterdir())
    assert time.monotonic() - start < 10  # a 404, not retried

    manager = _checkpoint_manager(str(missing / "run" / "checkpoints"))  # creating it succeeds
    # The first of the save's threads to fail wins: gcsfs's 404 for the metadata (FileNotFoundError)
    # or tensorstore's for the arrays (ValueError: NOT_FOUND: Error writing gs://...).
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-bucket-here"):
        manager.save(1, args=ocp.args.StandardSave(_state(1)))
        manager.wait_until_finished()
        manager.check_for_errors()
    assert time.monotonic() - start < 30
    with contextlib.suppress(Exception):
        manager.close()


def test_unserved_schemes(gcs_bucket):
    with pytest.raises(KeyError, match="foo://"):  # epath knows gs, s3, az, hf only
        epath.Path("foo://bucket/x")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Install s3fs"):
            epath.Path("s3://bucket/x").exists()  # the path builds; its first use fails
