"""Checkpoints with orbax: asynchronous saves, the last K kept (and the best by eval accuracy).

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a save
cut short never replaces the previous good checkpoint. Every process calls save and restore; the
arrays are global and orbax writes each shard once.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

DIRECTORY = "checkpoints"


def create_manager(workdir: str, config: Any) -> ocp.CheckpointManager:
    """config: the `checkpoint` section (every_steps, keep, keep_best)."""
    policies = [checkpoint_managers.LatestN(config.keep)]
    if config.keep_best:
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics["eval_accuracy"], n=1,
            keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.every_steps,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), DIRECTORY), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` at `step` if the interval (or `force`) says so."""
    return manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=force)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Any | None:
    """The latest checkpoint restored onto `target`'s structure and shardings, or None if none."""
    step = manager.latest_step()
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.StandardRestore(target))


def read_latest(workdir: str) -> tuple[int, Any]:
    """(step, state as nested dicts) of a run's latest checkpoint, on this process's first device.

    For reading a run from any machine: the topology that saved it does not matter.
    """
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), DIRECTORY), item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                          manager.item_metadata(step))
    return step, manager.restore(step, args=ocp.args.StandardRestore(target))
