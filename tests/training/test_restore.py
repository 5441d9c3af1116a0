"""A run's checkpoint restored onto the train state: the fields by their current names."""

import dataclasses

import jax
import ml_collections
import numpy as np
from etils import epath

from resnet_jax.run import checkpoint
from resnet_jax.training import metrics, steps


def test_a_checkpoint_written_before_model_state_was_named_so_restores(tmp_path):
    # Checkpoints of runs started before the rename hold the same arrays as "batch_stats".
    state = steps.TrainState(step=np.int32(5), params={"w": np.arange(3, dtype=np.float32)},
                             model_state={"mean": np.full(2, 0.5, np.float32)},
                             opt_state={"momentum": np.ones(3, np.float32)},
                             train_metrics=metrics.TrainMetrics.empty(), skipped=np.int32(0),
                             warmed_up=np.bool_(True))
    former = {("batch_stats" if f.name == "model_state" else f.name): getattr(state, f.name)
              for f in dataclasses.fields(state) if f.name != "device_stats"}
    manager = checkpoint.create_manager(epath.Path(tmp_path), ml_collections.ConfigDict(
        dict(every_steps=10, keep=2, keep_best=False, timeout_seconds=60)))
    checkpoint.save(manager, 5, former, force=True)
    checkpoint.wait(manager)
    mesh = jax.sharding.Mesh(jax.devices(), ("batch",))
    blank = jax.tree.map(np.zeros_like, state)
    restored = checkpoint.restore_latest(manager, steps.restore_target(blank, mesh), epath.Path(tmp_path))
    again = steps.TrainState(**steps.current_names(restored))
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, want)
    assert np.asarray(again.model_state["mean"]).tolist() == [0.5, 0.5]
