"""Checkpoints with orbax: asynchronous saves, the last K kept (and the best by eval accuracy).

The workdir is an `etils.epath.Path`, local or in a bucket: orbax and tensorstore write there.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a save
cut short never replaces the previous good checkpoint. Every process calls save and restore; the
arrays are global and orbax writes each shard once.
"""

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental.multihost_utils import sync_global_devices
from orbax.checkpoint import checkpoint_managers

from resnet_jax import workdir as workdirs

DIRECTORY = "checkpoints"


def create_manager(workdir: epath.Path, config: Any) -> ocp.CheckpointManager:
    """config: the `checkpoint` section (every_steps, keep, keep_best)."""
    policies = [checkpoint_managers.LatestN(config.keep)]
    best = {}
    if config.keep_best:
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=_eval_accuracy, n=1, keep_checkpoints_without_metrics=False))
        # best_fn makes orbax write each save's metrics into its step directory, so that the
        # best is known again after a restart; the preservation policy alone keeps them in memory.
        best = dict(best_fn=_eval_accuracy, best_mode="max")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.every_steps,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=True, **best)
    directory = workdir / DIRECTORY
    # The handler named, so that item_metadata can read a checkpoint's shapes before restoring it.
    try:
        return ocp.CheckpointManager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())
    except ValueError:  # orbax reads every step's metrics here, and a corrupt file stops it
        _set_aside(directory, _unreadable_metrics(directory), workdir)
        return ocp.CheckpointManager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())


def _unreadable_metrics(directory: epath.Path) -> list[tuple[int, str]]:
    failed = []
    for step_dir in directory.iterdir():
        metrics = step_dir / ocp.checkpoint_manager.METRIC_ITEM_NAME / ocp.checkpoint_manager.METRIC_ITEM_NAME
        if step_dir.name.isdigit() and metrics.exists():
            try:
                json.loads(metrics.read_text())
            except ValueError as error:
                failed.append(_unreadable(directory, int(step_dir.name), error))
    return failed


def _eval_accuracy(metrics: dict[str, float]) -> float:
    return metrics["eval_accuracy"]


class CheckpointError(RuntimeError):
    """A save failed (a full disk, a lost bucket); the latest complete checkpoint is intact."""


def _failed(manager: ocp.CheckpointManager, what: str, error: Exception) -> CheckpointError:
    manager.reload()
    return CheckpointError(f"{what} failed ({' '.join(str(error).split())}); the latest complete "
                           f"checkpoint, of step {manager.latest_step()}, is intact in {manager.directory}")


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, float] | None = None, force: bool = False) -> None:
    """Starts an asynchronous save of `state` at `step` if the interval (or `force`) says so.

    An earlier asynchronous save's failure surfaces here or in `wait`.
    """
    if metrics is not None:  # written as JSON with the checkpoint: Python numbers, not numpy's
        metrics = {name: float(value) for name, value in metrics.items()}
    try:
        manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=force)
    except Exception as error:
        raise _failed(manager, f"saving the checkpoint of step {step}", error) from error


def wait(manager: ocp.CheckpointManager) -> None:
    """Waits for the saves in flight; raises CheckpointError if one failed."""
    try:
        manager.wait_until_finished()
        manager.check_for_errors()
    except Exception as error:
        raise _failed(manager, "saving a checkpoint", error) from error


def _shapes(tree: Any) -> list[tuple[int, ...]]:
    return sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(tree))


class UnrestorableError(CheckpointError):
    """Every checkpoint of a workdir failed to restore: the run does not silently start over."""


RESTART_FLAG = "--restart"


def restore_latest(manager: ocp.CheckpointManager, target: Any, workdir: epath.Path,
                   restart: bool = False) -> Any | None:
    """The latest readable checkpoint restored onto `target`'s structure and shardings, or None
    where there is none.

    A checkpoint that cannot be read (truncated, corrupted or missing files, unreadable
    metadata) is named in the log and the one before it is tried; once one restores, the
    unreadable newer ones are moved to WORKDIR/corrupt_checkpoints/STEP, so that the run may
    write those steps again. If none restores, UnrestorableError names them all, unless
    `restart`: then they are moved aside and the run starts from step 0. A readable checkpoint
    of another model (a changed config) is an error, not corruption: it stays where it is.
    """
    failed = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            metadata = manager.item_metadata(step)
            if metadata is None:  # orbax's answer when the item's _METADATA is missing
                raise FileNotFoundError("its metadata is missing")
        except Exception as error:  # orbax and tensorstore raise many kinds
            failed.append(_unreadable(manager.directory, step, error))
            continue
        if _shapes(metadata) != _shapes(target):
            raise CheckpointError(f"the checkpoint of step {step} in {manager.directory} holds arrays of "
                                  f"other shapes than this config's model and optimizer; use another "
                                  f"--workdir for another model")
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as error:
            failed.append(_unreadable(manager.directory, step, error))
            continue
        _set_aside(manager.directory, failed, workdir)
        manager.reload()
        return restored
    if failed and not restart:
        raise UnrestorableError(
            f"no checkpoint in {manager.directory} can be restored ("
            + "; ".join(f"step {step}: {reason}" for step, reason in failed)
            + f"); {RESTART_FLAG} moves them to {workdir / 'corrupt_checkpoints'} and starts from step 0")
    _set_aside(manager.directory, failed, workdir)
    manager.reload()
    return None


def _unreadable(directory: epath.Path, step: int, error: Exception) -> tuple[int, str]:
    reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    logging.warning("The checkpoint of step %d in %s is unreadable (%s); trying the one before.",
                    step, directory, reason)
    return step, reason


def _set_aside(directory: epath.Path, failed: list[tuple[int, str]], workdir: epath.Path) -> None:
    """Moves the unreadable steps to WORKDIR/corrupt_checkpoints (process 0; the others wait).
    A step that cannot be moved (no permission) is left where it is, said in the log."""
    if not failed:
        return
    if jax.process_index() == 0:
        for step, _ in failed:
            aside = workdir / "corrupt_checkpoints" / str(step)
            try:
                aside.parent.mkdir(parents=True, exist_ok=True)
                (epath.Path(directory) / str(step)).rename(aside)
                logging.warning("Moved the unreadable checkpoint of step %d to %s.", step, aside)
            except OSError as error:
                logging.warning("Could not move the unreadable checkpoint of step %d to %s (%s); "
                                "it stays where it is.", step, aside, error)
    sync_global_devices(f"corrupt checkpoints {[step for step, _ in failed]} set aside")


def read_latest(workdir) -> tuple[int, Any]:
    """(step, state as nested dicts) of a run's latest checkpoint, on this process's first device.

    For reading a run from any machine: the topology that saved it does not matter.
    """
    manager = ocp.CheckpointManager(
        workdirs.resolve(str(workdir)) / DIRECTORY, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                          manager.item_metadata(step))
    return step, manager.restore(step, args=ocp.args.StandardRestore(target))
