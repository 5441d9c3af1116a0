"""Which checkpoints the manager keeps, across restarts: the last `keep` and the best by eval."""

import ml_collections
import numpy as np
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
            checkpoint.save(manager, step, state, metrics={"eval_accuracy": accuracy[step]})
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
