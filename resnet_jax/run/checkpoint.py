"""Checkpoints with orbax: asynchronous saves, the last K kept (and the best by eval accuracy).

The workdir is an `etils.epath.Path`, local or in a bucket: orbax and tensorstore write there.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a save
cut short never replaces the previous good checkpoint. Every process calls save and restore; the
arrays are global and orbax writes each shard once.

Each checkpoint carries a checksum of every array it holds (checksums.py), in its step metadata,
and a restore compares them.
"""

import errno
import json
import os
import time
import traceback
import weakref
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from resnet_jax.run import checksums, paths

DIRECTORY = "checkpoints"


class _Manager(ocp.CheckpointManager):
    """orbax's manager, whose own preemption questions (as a save starts; on process 0, from the
    thread that finalizes a save, with that save's step) are answered from `reached_preemption`'s
    last answer. JAX's sync point is one past the last step each process asked about: the
    finalize thread's older step made it one that process 0 had already passed, and the other
    processes stopped at it alone."""

    preempted_at: int | None = None

    def reached_preemption(self, step: int) -> bool:
        return step == self.preempted_at


def reached_preemption(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether every process stops at `step` (JAX's preemption sync point): asked by the training
    loop alone, once at every step, on every process."""
    if multihost_utils.reached_preemption_sync_point(step):
        manager.preempted_at = step
    return manager.reached_preemption(step)


def create_manager(workdir: epath.Path, config: Any) -> ocp.CheckpointManager:
    """config: the `checkpoint` section (every_steps, keep, keep_best, timeout_seconds)."""
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
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(timeout_secs=config.timeout_seconds), **best)
    directory = workdir / DIRECTORY
    # The handler named, so that item_metadata can read a checkpoint's shapes before restoring it.
    try:
        return _Manager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())
    except ValueError:  # orbax reads every step's metrics here, and a corrupt file stops it
        _set_aside(directory, _unreadable_metrics(directory), workdir)
        return _Manager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())


def _unreadable_metrics(directory: epath.Path) -> list[tuple[int, str]]:
    failed = []
    for step_dir in directory.iterdir():
        metrics = step_dir / ocp.checkpoint_manager.METRIC_ITEM_NAME / ocp.checkpoint_manager.METRIC_ITEM_NAME
        if step_dir.name.isdigit() and metrics.exists():
            try:
                json.loads(metrics.read_text())
            except ValueError as error:
                failed.append(_corrupt(directory, int(step_dir.name), error))
    return failed


def _eval_accuracy(metrics: dict[str, float]) -> float:
    return metrics["eval_accuracy"]


class CheckpointError(RuntimeError):
    """A save failed (a full disk, a lost bucket); the latest complete checkpoint is intact."""

    what = "in flight"  # which save: "of step S"
    waited_only = False  # failed only at a barrier of orbax's that another process missed


# Each manager's asynchronous save in flight, by step: a failure found later (in `wait`, or by the
# next save) is that save's, whether or not its directory was already made or removed.
_IN_FLIGHT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _settle(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight, whatever its outcome (an error being reported already)."""
    try:
        manager.wait_until_finished()
    except Exception:  # a failed save is not complete, which is all the callers need to know
        pass


def last_complete(manager: ocp.CheckpointManager) -> str:
    """What an error says is left: 'the latest complete checkpoint, of step S, is intact in DIR',
    or that none was written. Waits for the save in flight first, and removes what failed saves
    left (`_remove_temporary`): whatever stops the run, no half-written checkpoint stays."""
    _remove_temporary(manager)
    return _latest(manager)


def _latest(manager: ocp.CheckpointManager) -> str:
    try:
        manager.reload()
        step = manager.latest_step()
    except Exception as error:  # a disk that fails even this: the error being reported comes first
        return f"the checkpoints in {manager.directory} could not be read ({' '.join(str(error).split())})"
    if step is None:
        return f"no checkpoint is complete: none was written to {manager.directory}"
    return f"the latest complete checkpoint, of step {step}, is intact in {manager.directory}"


def _failed(manager: ocp.CheckpointManager, error: Exception, step: int | None = None) -> CheckpointError:
    """The one line for a failed save. `step`: the save that raised; else the steps whose
    half-written directories the failure left (an asynchronous save's)."""
    left = _remove_temporary(manager)
    steps = [step] if step is not None else left
    what = f"of step {', '.join(map(str, steps))}" if steps else "in flight"
    cause = _cause(error)
    waited_only = _timed_out(cause)  # at a barrier of orbax's that another process missed
    shown = error if waited_only else cause
    failure = CheckpointError(f"saving the checkpoint {what} failed ({' '.join(str(shown).split())}); "
                              f"{_latest(manager)}")
    failure.__cause__, failure.waited_only, failure.what = error, waited_only, what
    return failure


def _timed_out(error: BaseException) -> bool:
    # How JAX's coordination service ends a barrier a process never reached (orbax's test), and
    # how orbax says it.
    return isinstance(error, TimeoutError) or "DEADLINE_EXCEEDED" in str(error)


def _cause(error: BaseException) -> BaseException:
    """What made this process miss orbax's barrier, where `error` is a barrier's time-out raised
    while handling it (a failed write); else the time-out itself."""
    while _timed_out(error) and error.__context__ is not None:
        error = error.__context__
    return error


REMOVE_ATTEMPTS = 5


def remove_tree(path: epath.Path, attempts: int = REMOVE_ATTEMPTS) -> None:
    """`path.rmtree()`, tried again while it finds files it did not list: a failed save's other
    writer threads may still be adding files after orbax has reported the failure."""
    for attempt in range(attempts):
        try:
            path.rmtree()
            return
        except OSError as error:
            if error.errno != errno.ENOTEMPTY or attempt == attempts - 1:
                raise
            time.sleep(0.1 * 2**attempt)


def _remove_temporary(manager: ocp.CheckpointManager) -> list[int]:
    """Removes what failed saves left (process 0) and returns their steps: a step's temporary
    directory on a local disk, an uncommitted step in a bucket (orbax's test of either), so that a
    full disk leaves no half checkpoint. No barrier: the other processes may not have failed."""
    _settle(manager)
    steps = []
    directory = epath.Path(manager.directory)
    try:
        for path in directory.iterdir() if directory.exists() else ():
            name = path.name.split(".")[0]
            if name.isdigit() and ocp.step.is_path_temporary(path):
                steps.append(int(name))
                if jax.process_index() == 0:
                    remove_tree(path)
                    logging.info("Removed %s, left by the failed save.", path)
    except Exception as error:  # a disk that fails even this: the save's error is the one to see
        logging.warning("Could not remove the temporary directories in %s (%s)", manager.directory, error)
    return sorted(steps)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, float] | None = None, force: bool = False, final: bool = False) -> None:
    """Starts an asynchronous save of `state` at `step` if the interval (or `force`) says so,
    with the checksums of its arrays; `final` marks the run's last step (`is_final`).

    An earlier asynchronous save's failure surfaces here, named as its own, or in `wait`.
    """
    if not (force or manager.should_save(step)):
        return
    wait(manager)  # orbax waits for the save in flight anyway; its failure is not this step's
    if metrics is not None:  # written as JSON with the checkpoint: Python numbers, not numpy's
        metrics = {name: float(value) for name, value in metrics.items()}
    # In the step's metadata, which orbax writes into the step's directory before it commits it.
    values = jax.device_get(checksums.on_devices(state)[0])
    sums = dict(zip(checksums.leaf_names(state), map(int, values)))
    failure = None
    try:
        manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=force,
                     custom_metadata={CHECKSUMS: sums, FINAL: final})
        _IN_FLIGHT[manager] = step
    except Exception as error:
        failure = _failed(manager, error, step)
    _agree(manager, failure, f"of step {step}")


def wait(manager: ocp.CheckpointManager) -> None:
    """Waits for the saves in flight; raises CheckpointError if one failed, on any process."""
    failure, step = None, _IN_FLIGHT.pop(manager, None)
    try:
        manager.wait_until_finished()
        manager.check_for_errors()
    except Exception as error:
        failure = _failed(manager, error, step)
    what = "in flight" if step is None else f"of step {step}"
    _agree(manager, failure, failure.what if failure else what)


def _agree(manager: ocp.CheckpointManager, failure: CheckpointError | None, what: str) -> None:
    """Raises `failure` (this process's), or where another process's save failed, a
    CheckpointError naming it: every process calls this at the same point and stops alike, none
    going on into a step the others never join. A process whose save failed skips orbax's
    barriers, where the others wait until checkpoint.timeout_seconds and fail only for that
    (`waited_only`): the process that failed first is the one named."""
    if jax.process_count() > 1:
        mine = 0 if failure is None else 1 if failure.waited_only else 2
        states = np.asarray(multihost_utils.process_allgather(np.int32(mine)))
        if mine < 2 and (states == 2).any():
            failure = CheckpointError(f"saving the checkpoint {what} failed on process "
                                      f"{int((states == 2).argmax())} (its own line says why); "
                                      f"{_latest(manager)}")
    if failure is not None:
        raise failure


# Keys of the step metadata's custom_metadata: the arrays' checksums; whether it is the last step.
CHECKSUMS, FINAL = "checksums", "final"


class CorruptCheckpoint(ValueError):
    """A checkpoint that restored, but not with what was saved (or with non-finite values)."""


def _saved_checksums(step_dir: epath.Path) -> dict[str, int] | None:
    """The checksums in a step's metadata; None for a step saved before there were any. A missing
    or unreadable metadata file is corruption: orbax would read it as empty."""
    path = step_dir / "_CHECKPOINT_METADATA"
    if not path.exists():
        raise CorruptCheckpoint(f"its step metadata {path.name} is missing")
    try:
        metadata = json.loads(path.read_text())
    except ValueError as error:
        raise CorruptCheckpoint(f"its step metadata {path.name} is not JSON ({error})") from None
    return (metadata.get("custom_metadata") or {}).get(CHECKSUMS)


def _verify(restored: Any, saved: dict[str, int] | None, step: int,
            digest: Callable[[Any], Any] = checksums.on_devices) -> None:
    """Raises CorruptCheckpoint unless each restored array has its saved checksum and is finite."""
    sums, finite = jax.device_get(digest(restored))
    names = checksums.leaf_names(restored)
    if saved is None:
        logging.warning("The checkpoint of step %d has no checksums (saved before they were "
                        "written): restored without verifying it.", step)
    elif sorted(saved) != sorted(names):
        raise CorruptCheckpoint("its checksums name other arrays than it holds")
    else:
        for name, checksum in zip(names, sums):
            if int(checksum) != saved[name]:
                raise CorruptCheckpoint(f"{name} has checksum {int(checksum):08x}, "
                                        f"saved {saved[name]:08x}")
    bad = [name for name, ok in zip(names, finite) if not ok]
    if bad:
        more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
        raise CorruptCheckpoint(f"{bad[0]} holds non-finite values{more}")


def _shapes(tree: Any) -> list[tuple[int, ...]]:
    return sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(tree))


class UnrestorableError(CheckpointError):
    """Every checkpoint of a workdir failed to restore: the run does not silently start over."""


RESTART_FLAG = "--restart"


def restore_latest(manager: ocp.CheckpointManager, target: Any, workdir: epath.Path,
                   restart: bool = False) -> Any | None:
    """The latest readable checkpoint restored onto `target`'s structure and shardings, or None
    where there is none. `target` may also be a function of a step's metadata (its tree of
    nested dicts) that returns the target for that step.

    A corrupt checkpoint (truncated, changed or missing files, unreadable metadata, an array
    whose checksum is not the saved one, a non-finite value) is named in the log and the one
    before it is tried; once one restores, the corrupt newer ones are moved to
    WORKDIR/corrupt_checkpoints/STEP, so that the run may write those steps again. If none
    restores, UnrestorableError names them all, unless `restart`: then they are moved aside and
    the run starts from step 0. A readable checkpoint of another model (a changed config) is an
    error, not corruption: it stays where it is.
    """
    failed = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            metadata = manager.item_metadata(step)
            if metadata is None:  # orbax's answer when the item's _METADATA is missing
                raise FileNotFoundError("its metadata is missing")
            saved = _saved_checksums(epath.Path(manager.directory) / str(step))
        except Exception as error:  # orbax and tensorstore raise many kinds
            failed.append(_corrupt(manager.directory, step, error))
            continue
        step_target = target(metadata.tree) if callable(target) else target
        if _shapes(metadata) != _shapes(step_target):
            raise CheckpointError(f"the checkpoint of step {step} in {manager.directory} holds arrays of "
                                  f"other shapes than this config's model and optimizer; use another "
                                  f"--workdir for another model")
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(step_target))
            _verify(restored, saved, step)
        except Exception as error:
            failed.append(_corrupt(manager.directory, step, error))
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


def quiet_closed_loop(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A sys.unraisablehook for the commands that read checkpoints. After a failed restore,
    tensorstore completes the reads still in flight into the event loop orbax has closed: each
    raises 'Event loop is closed' there (131 after one truncated checkpoint); and the reads of a
    checkpoint a live run deleted meanwhile fail in coroutines orbax drops. Python's hook prints
    each from its thread, a traceback of tens of lines, through the one-line error. Those go to
    the log (debug); others on."""
    def hook(unraisable):
        error = unraisable.exc_value
        frames = traceback.extract_tb(error.__traceback__) if error is not None else []
        if ((isinstance(error, RuntimeError) and str(error) == "Event loop is closed")
                or (frames and f"{os.sep}orbax{os.sep}" in frames[-1].filename)):
            logging.debug("A read of a failed restore ended after it: %s", error)
        else:
            previous(unraisable)
    return hook


def _corrupt(directory: epath.Path, step: int, error: Exception) -> tuple[int, str]:
    reason = ' '.join(str(error).split())[:300]
    if not isinstance(error, CorruptCheckpoint):
        reason = f"{type(error).__name__}: {reason}"
    logging.warning("The checkpoint of step %d in %s is corrupt or unreadable (%s); trying the "
                    "one before.", step, directory, reason)
    return step, reason


def _set_aside(directory: epath.Path, failed: list[tuple[int, str]], workdir: epath.Path) -> None:
    """Moves the corrupt steps to WORKDIR/corrupt_checkpoints (process 0; the others wait).
    A step that cannot be moved (no permission) is left where it is, said in the log."""
    if not failed:
        return
    if jax.process_index() == 0:
        for step, _ in failed:
            aside = workdir / "corrupt_checkpoints" / str(step)
            try:
                aside.parent.mkdir(parents=True, exist_ok=True)
                (epath.Path(directory) / str(step)).rename(aside)
                logging.warning("Moved the corrupt checkpoint of step %d to %s.", step, aside)
            except OSError as error:
                logging.warning("Could not move the corrupt checkpoint of step %d to %s (%s); "
                                "it stays where it is.", step, aside, error)
    multihost_utils.sync_global_devices(f"corrupt checkpoints {[step for step, _ in failed]} set aside")


def reader(workdir: epath.Path) -> ocp.CheckpointManager:
    """A manager that only reads a run's checkpoints (and knows its best by eval accuracy)."""
    return ocp.CheckpointManager(
        workdir / DIRECTORY, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(read_only=True, best_fn=_eval_accuracy, best_mode="max"))


def read(manager: ocp.CheckpointManager, step: int, sharding: jax.sharding.Sharding) -> Any:
    """The checkpoint of `step` as nested dicts of arrays placed with `sharding`, verified against
    its checksums and finite; raises CorruptCheckpoint (or orbax's error for unreadable files).
    Writes nothing: whatever is wrong stays where it is."""
    saved = _saved_checksums(epath.Path(manager.directory) / str(step))
    metadata = manager.item_metadata(step)
    if metadata is None:  # orbax's answer when the item's _METADATA is missing
        raise CorruptCheckpoint("its metadata is missing")
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          metadata)
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    _verify(restored, saved, step, checksums.on_host)  # whole arrays: numpy, no compile
    return restored


def is_final(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether the checkpoint of `step` was saved as its run's last step (`save(final=True)`)."""
    metadata = json.loads((epath.Path(manager.directory) / str(step) / "_CHECKPOINT_METADATA").read_text())
    return bool((metadata.get("custom_metadata") or {}).get(FINAL))


def pure(tree: Any) -> Any:
    """A checkpoint's nested dicts as `nnx.State.replace_by_pure_dict` takes them: list indices
    back to integers, and each variable's {"value": array} to the array."""
    if not isinstance(tree, dict):
        return tree
    if tree.keys() == {"value"}:
        return tree["value"]
    return {int(k) if k.isdigit() else k: pure(v) for k, v in tree.items()}


def read_latest(workdir) -> tuple[int, Any]:
    """(step, state as nested dicts) of a run's latest checkpoint, on this process's first device.

    For reading a run from any machine: the topology that saved it does not matter.
    """
    manager = reader(paths.resolve(str(workdir)))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                          manager.item_metadata(step))
    return step, manager.restore(step, args=ocp.args.StandardRestore(target))
