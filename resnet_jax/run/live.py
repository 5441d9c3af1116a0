"""A checkpoint read beside a run that may still be saving: `python -m resnet_jax.evaluate` on a
live run. Such a run deletes its older checkpoints as it saves new ones (it keeps the last
checkpoint.keep): a step deleted while it is read is read again as the step `which` names now
(latest, best), a few times; a step named by number is gone (StepDeleted); a run that saves
faster than its steps can be read is said so (SavingTooFast). Only a step still there that fails
to read is corrupt."""

import time
from typing import Any, Callable, TypeVar

from absl import logging

from resnet_jax.run import checkpoint


CHECKPOINTS = "latest, best or a step number"


def checkpoint_step(manager, which: str) -> int:
    """The step that --checkpoint names among the manager's."""
    steps = manager.all_steps()
    if not steps:
        raise ValueError(f"--checkpoint: there is no checkpoint in {manager.directory}")
    if which == "latest":
        return manager.latest_step()
    if which == "best":
        step = manager.best_step()
        if step is None:
            raise ValueError(f"--checkpoint=best: no checkpoint in {manager.directory} has eval metrics")
        return step
    saved = ", ".join(map(str, sorted(steps)))
    if not which.isdigit():
        raise ValueError(f"--checkpoint must be {CHECKPOINTS} (steps in {manager.directory}: "
                         f"{saved}); got {which!r}")
    if int(which) not in steps:
        raise ValueError(f"--checkpoint={which}: {manager.directory} holds no checkpoint of step "
                         f"{which}; it holds steps {saved}")
    return int(which)


# A live run's deletions: how many steps may be lost to them, how long a deletion may take to
# finish once a read has failed on it, and how often to look.
ATTEMPTS = 5


DELETION_GRACE_SECONDS = 10.0


POLL_SECONDS = 0.1


class StepDeleted(ValueError):
    """The step --checkpoint named by number was deleted (by the run saving newer ones) while it
    was being read."""


class SavingTooFast(RuntimeError):
    """Every step read was deleted before the read ended: the run saves faster than this reads."""


T = TypeVar("T")


def _listing(manager_call: Callable[[], T]) -> T:
    """`manager_call()`, orbax listing the steps and reading their metrics, tried again where a
    step deleted as it is listed fails it."""
    for _ in range(ATTEMPTS - 1):
        try:
            return manager_call()
        except Exception:  # orbax raises many kinds; the last try's error is the one shown
            time.sleep(POLL_SECONDS)
    try:
        return manager_call()
    except Exception as error:
        raise ValueError(f"the checkpoints cannot be listed ({' '.join(str(error).split())})") from error


def reader(workdir):
    """`checkpoint.reader` of the run in `workdir` (an epath.Path), which lists its steps: tried
    again where the run deletes a step as it is listed."""
    return _listing(lambda: checkpoint.reader(workdir))


def _deleted(manager, step: int, grace: float) -> bool:
    """Whether `step`, whose read failed, was deleted by the run: no longer listed or its
    directory gone, now or within `grace` seconds (a deletion under way). The newest step is never
    deleted (a run deletes steps once it has saved a newer one), so it is not waited for."""
    directory = manager.directory / str(step)
    deadline = time.monotonic() + grace
    while step in manager.all_steps() and directory.exists():
        if manager.latest_step() == step or time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def _until_listed(manager, grace: float) -> None:
    """Waits up to `grace` seconds while no step is listed: a run that keeps one checkpoint
    between deleting it and committing the next."""
    deadline = time.monotonic() + grace
    while not manager.all_steps() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        _listing(manager.reload)


def _saving(manager) -> bool:
    """The checkpoints directory holds something though no step is listed: a save under way, or
    a step committed and an older one deleted between orbax's listing and its look at each."""
    directory = manager.directory
    try:
        return directory.exists() and any(directory.iterdir())
    except OSError:
        return False


def _unreadable(manager, step: int, error: Exception) -> Exception:
    reason = " ".join(str(error).split())[:300]
    if not isinstance(error, checkpoint.CorruptCheckpoint):
        reason = f"{type(error).__name__}: {reason}"
    return checkpoint.CorruptCheckpoint(
        f"the checkpoint of step {step} in {manager.directory} is corrupt or unreadable ({reason})")


def read_checkpoint(manager, which: str, sharding, attempts: int = ATTEMPTS,
                    grace: float = DELETION_GRACE_SECONDS) -> tuple[int, Any]:
    """(step, checkpoint as `checkpoint.read` gives it) of the step `which` names, read
    consistently beside a run that is still saving.

    A read fails when the run deletes its step meanwhile. Then the steps are listed again (orbax's
    manager keeps its list until `reload`; where none is, until the run commits its next, up to
    `grace`), and `latest` or `best` is read as the step it names now; a step named by number
    raises StepDeleted; after `attempts` lost steps, SavingTooFast.
    Only a step that is still there and fails to read raises `checkpoint.CorruptCheckpoint`.
    """
    lost = []
    if not manager.all_steps() and _saving(manager):  # listed as a save replaced the only step
        _until_listed(manager, grace)
    while len(lost) < attempts:
        step = checkpoint_step(manager, which)
        try:
            return step, checkpoint.read(manager, step, sharding)
        except Exception as error:  # orbax and tensorstore raise many kinds
            failure = error
        _listing(manager.reload)
        _until_listed(manager, grace)
        moved_on = not which.isdigit() and checkpoint_step(manager, which) != step
        if not moved_on and not _deleted(manager, step, grace):
            raise _unreadable(manager, step, failure) from failure
        if which.isdigit():
            raise StepDeleted(f"--checkpoint={which}: step {step} was deleted from {manager.directory} "
                              f"while it was being read, by the run saving newer checkpoints (steps "
                              f"there now: {', '.join(map(str, manager.all_steps())) or 'none'})")
        logging.info("The checkpoint of step %d could not be read and the run has saved newer ones "
                     "since (deleting older ones); reading the %s again.", step, which)
        lost.append(step)
    raise SavingTooFast(
        f"the run in {manager.directory.parent} is saving checkpoints faster than they can be read "
        f"(steps {', '.join(map(str, lost))} were each deleted while being read); run this again, "
        f"or give the run a larger checkpoint.keep")
