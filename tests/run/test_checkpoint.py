"""Which checkpoints the manager keeps across restarts (the last `keep` and the best by eval),
what a restart does with corrupt ones (checksums, non-finite values, unreadable parts), and what a
full disk leaves."""

import errno
import os
import threading
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax.run import checkpoint, checksums


def _manager(workdir, keep):
    return checkpoint.create_manager(epath.Path(workdir), ml_collections.ConfigDict(
        dict(every_steps=10, keep=keep, keep_best=True, timeout_seconds=1200)))


def test_the_best_checkpoint_outlives_restarts(tmp_path):
    # Saves every 10 steps with an eval, one kept besides the best. Step 20's accuracy is the
    # best; the run is restarted (a new manager reads the workdir) twice after it.
    accuracy = {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.1, 50: 0.2, 60: 0.3}
    state = {"w": np.zeros(3, np.float32)}
    for steps in ([10, 20, 30], [40, 50], [60]):
        manager = _manager(tmp_path, keep=1)
        for step in steps:
            checkpoint.save(manager, step, state, metrics={"eval_accuracy": np.float32(accuracy[step])})
            checkpoint.wait(manager)
        manager.close()
    manager = _manager(tmp_path, keep=1)
    assert manager.all_steps() == [20, 60]
    assert manager.best_step() == 20
    # A save without an eval is kept as the latest, not as the best.
    checkpoint.save(manager, 70, state, force=True)
    checkpoint.wait(manager)
    assert manager.all_steps() == [20, 70]
    manager.close()


def test_only_the_loop_asks_jax_for_the_preemption_sync_point(tmp_path, monkeypatch):
    # JAX's sync point is one past the last step each process asked about. orbax asks too, as a
    # save starts and, on process 0, from the thread that finalizes a save with that save's
    # (older) step: process 0 then stopped at no step while the others stopped (test_pods).
    asked = []

    def sync_point(step):
        asked.append((step, threading.current_thread() is threading.main_thread()))
        return step == 3

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", sync_point)
    manager = _manager(tmp_path, keep=5)
    answers = []
    for step in range(1, 5):
        answers.append(checkpoint.reached_preemption(manager, step))
        checkpoint.save(manager, step, {"w": np.full(3, step, np.float32)}, force=True)
    checkpoint.wait(manager)
    manager.close()
    assert asked == [(step, True) for step in range(1, 5)]
    assert answers == [False, False, True, False]


def _unraisable(code, filename):
    try:
        exec(compile(code, filename, "exec"))  # noqa: S102
    except BaseException as error:  # noqa: BLE001
        return types.SimpleNamespace(exc_value=error, exc_type=type(error), object=None)


def test_the_commands_hook_sends_orbaxs_dropped_reads_to_the_log_and_passes_the_rest_on(caplog):
    passed = []
    hook = checkpoint.quiet_closed_loop(passed.append)
    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    dropped = [_unraisable("raise Exception('Encountered error while reading array index')", orbax_file),
               _unraisable("raise RuntimeError('Event loop is closed')", "asyncio.py")]
    other = _unraisable("raise ValueError('a bug of ours')", "resnet_jax.py")
    with caplog.at_level("DEBUG"):
        for unraisable in [*dropped, other]:
            hook(unraisable)
    assert passed == [other]
    assert "Encountered error while reading array index" in caplog.text


def _saved(workdir, steps):
    manager = _manager(workdir, keep=5)
    for step in steps:
        checkpoint.save(manager, step, {"w": np.full(3, step, np.float32)}, force=True)
        checkpoint.wait(manager)
    manager.close()
    return epath.Path(workdir) / "checkpoints"


def _break(step_dir, how):
    if how == "metadata":  # the item's _METADATA deleted
        (step_dir / "default" / "_METADATA").unlink()
    elif how == "step metadata":  # the step's _CHECKPOINT_METADATA, with its checksums, deleted
        (step_dir / "_CHECKPOINT_METADATA").unlink()
    elif how == "torn step metadata":  # orbax reads it as empty metadata, without a word
        path = step_dir / "_CHECKPOINT_METADATA"
        path.write_text(path.read_text()[:40])
    else:  # every data file truncated to nothing
        for root, _, names in os.walk(step_dir / "default"):
            for name in names:
                if name != "_METADATA":
                    open(os.path.join(root, name), "wb").close()


@pytest.mark.parametrize("how", ["metadata", "data", "step metadata", "torn step metadata"])
def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, how):
    checkpoints = _saved(tmp_path, [10, 20])
    _break(checkpoints / "20", how)
    manager = _manager(tmp_path, keep=5)
    restored = checkpoint.restore_latest(manager, {"w": np.zeros(3, np.float32)}, epath.Path(tmp_path))
    np.testing.assert_array_equal(restored["w"], np.full(3, 10))
    assert manager.all_steps() == [10]
    assert (tmp_path / "corrupt_checkpoints" / "20").exists()


def test_no_restorable_checkpoint_is_refused_unless_restart(tmp_path):
    checkpoints = _saved(tmp_path, [10, 20])
    _break(checkpoints / "20", "metadata")
    _break(checkpoints / "10", "data")
    target = {"w": np.zeros(3, np.float32)}
    manager = _manager(tmp_path, keep=5)
    with pytest.raises(checkpoint.UnrestorableError, match=r"^no checkpoint in .* can be restored "
                       r"\(step 20: .*; step 10: .*\); --restart moves them to .* starts from step 0$"):
        checkpoint.restore_latest(manager, target, epath.Path(tmp_path))
    assert manager.all_steps() == [10, 20]  # nothing moved: the next attempt is refused alike
    assert checkpoint.restore_latest(manager, target, epath.Path(tmp_path), restart=True) is None
    assert manager.all_steps() == []
    assert sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()) == ["10", "20"]


def test_an_unmovable_unreadable_checkpoint_is_skipped(tmp_path, monkeypatch, caplog):
    # As root no permission stops a rename here, so the failure is injected.
    checkpoints = _saved(tmp_path, [10, 20])
    _break(checkpoints / "20", "data")

    def refuse(self, target):
        raise PermissionError(f"[Errno 13] Permission denied: '{self}'")

    monkeypatch.setattr(type(checkpoints), "rename", refuse)
    manager = _manager(tmp_path, keep=5)
    restored = checkpoint.restore_latest(manager, {"w": np.zeros(3, np.float32)}, epath.Path(tmp_path))
    np.testing.assert_array_equal(restored["w"], np.full(3, 10))
    assert "Could not move the corrupt checkpoint of step 20" in caplog.text


def _random(step):
    """Random bits as float32 (none non-finite): incompressible, so that the data file holds
    their bytes as they are and a test can find them."""
    bits = np.random.default_rng(step).integers(0, 2**32, (64, 64), dtype=np.uint32).view(np.float32)
    return {"w": np.where(np.isfinite(bits), bits, 0).astype(np.float32), "count": np.asarray(step, np.int32)}


def _largest_file(step_dir):
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("how", ["one bit", "eight bytes"])
def test_a_changed_byte_fails_its_checksum_and_the_one_before_is_restored(tmp_path, how, caplog):
    # Issue 24, failure 2: one byte xor 1 in the newest step's largest data file, or eight bytes
    # of 0xff over its values (two NaNs), were restored without a word.
    manager = _manager(tmp_path, keep=5)
    for step in (10, 20):
        checkpoint.save(manager, step, _random(step), force=True)
        checkpoint.wait(manager)
    manager.close()
    path = _largest_file(tmp_path / "checkpoints" / "20")
    data = bytearray(open(path, "rb").read())
    if how == "one bit":
        data[len(data) // 2] ^= 1
    else:
        at = data.find(_random(20)["w"].tobytes()[4000:4016])
        assert at >= 0, "the values are not stored as they are"
        data[at:at + 8] = b"\xff" * 8
    open(path, "wb").write(data)
    target = jax.tree.map(np.zeros_like, _random(0))
    silent = _manager(tmp_path, keep=5).restore(20, args=checkpoint.ocp.args.StandardRestore(target))
    assert not np.array_equal(silent["w"], _random(20)["w"])  # orbax alone: no error
    assert how == "one bit" or np.isnan(silent["w"]).sum() == 2
    manager = _manager(tmp_path, keep=5)
    restored = checkpoint.restore_latest(manager, target, epath.Path(tmp_path))
    np.testing.assert_array_equal(restored["w"], _random(10)["w"])
    [line] = [r.getMessage() for r in caplog.records if "step 20" in r.getMessage() and "is corrupt" in r.getMessage()]
    assert "(w has checksum" in line and "\n" not in line, line
    assert manager.all_steps() == [10] and (tmp_path / "corrupt_checkpoints" / "20").exists()


@pytest.mark.parametrize("checksums", [True, False])
def test_a_checkpoint_with_non_finite_values_is_corrupt(tmp_path, checksums, caplog):
    # Saved so (checksums that match), or from before checksums: the finite check names the array.
    manager = _manager(tmp_path, keep=5)
    checkpoint.save(manager, 10, {"w": np.ones(3, np.float32), "n": np.ones((), np.int32)}, force=True)
    poisoned = {"w": np.asarray([1, np.nan, 1], np.float32), "n": np.full((), 2, np.int32)}
    if checksums:
        checkpoint.save(manager, 20, poisoned, force=True)
    else:
        manager.save(20, args=checkpoint.ocp.args.StandardSave(poisoned), force=True)
    checkpoint.wait(manager)
    target = {"w": np.zeros(3, np.float32), "n": np.zeros((), np.int32)}
    restored = checkpoint.restore_latest(manager, target, epath.Path(tmp_path))
    assert int(restored["n"]) == 1
    assert "The checkpoint of step 20" in caplog.text and "(w holds non-finite values)" in caplog.text
    assert ("restored without verifying it" in caplog.text) != checksums


def test_a_checkpoint_from_before_checksums_is_restored_with_a_warning(tmp_path, caplog):
    manager = _manager(tmp_path, keep=5)
    manager.save(10, args=checkpoint.ocp.args.StandardSave({"w": np.ones(3, np.float32)}), force=True)
    checkpoint.wait(manager)
    restored = checkpoint.restore_latest(manager, {"w": np.zeros(3, np.float32)}, epath.Path(tmp_path))
    np.testing.assert_array_equal(restored["w"], np.ones(3))
    assert "step 10 has no checksums" in caplog.text


KINDS = [np.float32, jnp.bfloat16, np.float16, np.int32, np.uint8, np.int8, np.bool_]


@pytest.mark.parametrize("digest", [checksums.on_devices, checksums.on_host], ids=["devices", "host"])
@pytest.mark.parametrize("dtype", KINDS, ids=[np.dtype(k).name for k in KINDS])
def test_any_flipped_bit_or_swap_changes_the_checksum(dtype, digest):
    raw = np.random.default_rng(0).integers(0, 256, (3, 8), dtype=np.uint8)
    if dtype == np.bool_:  # a bool's one bit
        values = raw % 2 == 1
        changed = [values ^ (np.arange(values.size) == i).reshape(values.shape) for i in range(values.size)]
    else:
        values = raw.view(dtype)
        changed = []
        for byte in range(raw.size):  # every bit of every element
            for bit in range(8):
                flipped = raw.copy().reshape(-1)
                flipped[byte] ^= 1 << bit
                changed.append(flipped.reshape(raw.shape).view(dtype))
    bits = values.view(np.uint8).reshape(values.size, -1)
    other = next(i for i in range(values.size) if (bits[i] != bits[0]).any())
    swapped = values.reshape(-1).copy()
    swapped[[0, other]] = swapped[[other, 0]]
    changed.append(swapped.reshape(values.shape))
    sums, _ = jax.device_get(digest([values, *changed]))
    assert len(set(sums.tolist())) == len(sums)  # all differ, and differ from the original


def test_the_host_computes_the_checksums_of_the_devices():
    # Training saves with on_devices; checkpoint.read verifies with on_host: the same numbers.
    rng = np.random.default_rng(1)
    leaves = [rng.integers(0, 256, shape + (np.dtype(kind).itemsize,), dtype=np.uint8).view(kind).reshape(shape)
              for kind in KINDS if kind != np.bool_ for shape in [(), (7,), (3, 1, 5), (2, 3, 3, 4)]]
    leaves += [rng.integers(0, 2, (4, 3)) == 1, np.array([1.0, np.inf], np.float32),
               np.array([np.nan], jnp.bfloat16), jax.random.split(jax.random.key(3), 4)]
    on_devices, on_host = jax.device_get(checksums.on_devices(leaves)), checksums.on_host(leaves)
    np.testing.assert_array_equal(on_host[0], on_devices[0])
    np.testing.assert_array_equal(on_host[1], on_devices[1])
    assert on_host[1][-4:].tolist() == [True, False, False, True]  # bools, inf, nan, keys


@pytest.mark.parametrize("digest", [checksums.on_devices, checksums.on_host], ids=["devices", "host"])
def test_the_checksum_of_a_key_array_is_its_key_data(digest):
    # The dropout streams of VGG's state are PRNG keys.
    sums, _ = jax.device_get(digest([jax.random.key(1), jax.random.key(2)]))
    assert sums[0] != sums[1]


@pytest.mark.parametrize("full_from, left", [
    (10, "no checkpoint is complete: none was written to"),
    (20, "the latest complete checkpoint, of step 10, is intact in")])
def test_a_full_disk_names_what_is_left_and_leaves_no_temporary_directory(tmp_path, monkeypatch,
                                                                          full_from, left):
    # The disk fills while a save of step `full_from` completes in the background, its data in
    # its temporary directory. (As root, no small file system can be made here: injected.)
    finalize = checkpoint.ocp.StandardCheckpointHandler.finalize

    def full(self, directory):
        if int(epath.Path(directory).parent.name.split(".")[0]) >= full_from:
            raise OSError(errno.ENOSPC, "No space left on device")
        return finalize(self, directory)

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointHandler, "finalize", full)
    manager = _manager(tmp_path, keep=5)
    with pytest.raises(checkpoint.CheckpointError) as raised:
        for step in (10, 20, 30):
            checkpoint.save(manager, step, {"w": np.full(3, step, np.float32)}, force=True)
        checkpoint.wait(manager)
    assert str(raised.value).startswith(f"saving the checkpoint of step {full_from} failed ([Errno 28] "
                                        f"No space left on device); {left}")
    assert "\n" not in str(raised.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(s) for s in (10, 20) if s < full_from]


def test_a_failed_save_is_named_by_its_step_when_its_directory_is_already_gone(tmp_path, monkeypatch):
    # Which half-written directory a failure left depends on timing (orbax's threads may remove
    # or not yet have made it); the save in flight is known whatever the timing.
    def full(self, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    remove = checkpoint._remove_temporary

    def removed_before_looking(manager):
        remove(manager)
        return []

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointHandler, "finalize", full)
    monkeypatch.setattr(checkpoint, "_remove_temporary", removed_before_looking)
    manager = _manager(tmp_path, keep=5)
    checkpoint.save(manager, 7, {"w": np.zeros(3, np.float32)}, force=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"^saving the checkpoint of step 7 failed"):
        checkpoint.wait(manager)


class _StillWritten:
    """A failed save's temporary directory that its late writer threads still add files to: the
    first `busy` removals find a file they did not list."""

    def __init__(self, busy: int, error: int = errno.ENOTEMPTY):
        self.busy, self.error, self.calls = busy, error, 0

    def rmtree(self):
        self.calls += 1
        if self.calls <= self.busy:
            raise OSError(self.error, os.strerror(self.error))


def test_a_directory_still_written_is_removed_once_its_writers_stop(monkeypatch):
    monkeypatch.setattr(checkpoint.time, "sleep", lambda seconds: None)
    path = _StillWritten(busy=2)
    checkpoint.remove_tree(path)
    assert path.calls == 3
    with pytest.raises(OSError) as raised:  # writers that never stop: the error is not hidden
        checkpoint.remove_tree(_StillWritten(busy=checkpoint.REMOVE_ATTEMPTS))
    assert raised.value.errno == errno.ENOTEMPTY
    denied = _StillWritten(busy=1, error=errno.EACCES)
    with pytest.raises(PermissionError):  # any other failure at once
        checkpoint.remove_tree(denied)
    assert denied.calls == 1
