"""Which checkpoints the manager keeps across restarts (the last `keep` and the best by eval),
and what a restart does with unreadable ones."""

import os

import ml_collections
import numpy as np
import pytest
from etils import epath

from resnet_jax import checkpoint


def _manager(workdir, keep):
    return checkpoint.create_manager(epath.Path(workdir), ml_collections.ConfigDict(
        dict(every_steps=10, keep=keep, keep_best=True)))


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
    else:  # every data file truncated to nothing
        for root, _, names in os.walk(step_dir / "default"):
            for name in names:
                if name != "_METADATA":
                    open(os.path.join(root, name), "wb").close()


@pytest.mark.parametrize("how", ["metadata", "data"])
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
    assert "Could not move the unreadable checkpoint of step 20" in caplog.text
