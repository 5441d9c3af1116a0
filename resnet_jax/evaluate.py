"""Evaluate a run's checkpoint, or a file of weights, on an eval split with any test protocol:

    python -m resnet_jax.evaluate --workdir=DIR [--checkpoint=latest|best|STEP] [--json=FILE]
        [--config.data.eval_split=... --config.data.eval_preprocess=ten_crop|multi_scale ...]
    python -m resnet_jax.evaluate --config=resnet50 --weights=resnet50.pth [--config.data...]

Prints one line with the metrics, named as in metrics.jsonl (eval_accuracy, eval_loss,
eval_top5_accuracy), and writes them with the step as JSON to --json where asked (whole, or not
at all). The config is the run's own (WORKDIR/config.json; or --config=NAME|PATH[:ARG]), with the
command line's overrides: on the run's settings the numbers are those of the run's eval of that
step. It writes nothing else: the workdir is only read. On a pod every process runs the same
command.

A run still training deletes its older checkpoints as it saves new ones (it keeps the last
checkpoint.keep): a step deleted while it is being read is read again as the step --checkpoint
names now (latest, best), a few times; a step named by number is gone.

Exit statuses: 0 evaluated; 2 bad input, refused in one line, or a checkpoint that cannot be
evaluated: corrupt or unreadable (while still there), or the step named by number deleted by the
run while being read; 75 the run saves checkpoints faster than they can be read (each one read
was deleted before the read ended): run it again, or give the run a larger checkpoint.keep;
130 stopped by Ctrl-C. Each of these ends in one line on stderr, without a traceback.
"""

import sys

from resnet_jax.training import interrupt

# First: the imports below take seconds.
if __name__ == "__main__":
    interrupt.install("resnet_jax")

import json  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, NamedTuple, TypeVar  # noqa: E402

from resnet_jax import cpu  # noqa: E402

cpu.set_cpu_fusion()  # before JAX starts its backends

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax.cli import config_files, config_help
from resnet_jax.distributed import sharding
from resnet_jax.run import console  # noqa: E402

CHECKPOINTS = "latest, best or a step number"


class Weights(NamedTuple):
    """What an eval step takes of a TrainState."""
    params: Any
    batch_stats: Any


def _fail(message: str) -> None:
    print(f"resnet_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _value(argv: list[str], name: str) -> str | None:
    """--NAME=VALUE of the command line, read before the flags are defined."""
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)


def _base_config(argv: list[str]):
    """--config's config, or the workdir's; --config.FIELD overrides apply on top of it."""
    import runpy  # pylint: disable=import-outside-toplevel

    from resnet_jax.run import paths

    spec, workdir = _value(argv, "config"), _value(argv, "workdir")
    if spec:
        path, _, arg = config_files.resolve(spec).partition(":")
        get_config = runpy.run_path(path)["get_config"]
        return get_config(arg) if arg else get_config()
    if not workdir:
        raise ValueError("--workdir (a run to evaluate) is required, or --config with --weights")
    saved = paths.resolve(workdir) / "config.json"
    if not saved.exists():
        raise ValueError(f"--workdir: {saved} does not exist: no run was started in {workdir}")
    return config_files.of_run(workdir)


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
SAVING_TOO_FAST_STATUS = 75  # EX_TEMPFAIL, "try again", as the main job's preemption


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
    from resnet_jax.run import checkpoint

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


def _unreadable(manager, step: int, error: Exception) -> Exception:
    from resnet_jax.run import checkpoint

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
    from resnet_jax.run import checkpoint

    lost = []
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


def evaluate(config: Any, workdir: str | None, which: str = "latest",
             weights: str | None = None) -> tuple[int | None, dict[str, float]]:
    """(step, eval metrics) of checkpoint `which` of the run in `workdir`, or of the torchvision
    or safetensors file `weights` (step None), evaluated as the run evaluates. Raises ValueError
    (one line) for bad input, `checkpoint.CorruptCheckpoint` for a checkpoint that is not what
    was saved, StepDeleted and SavingTooFast as `read_checkpoint` does."""
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from resnet_jax import convert
    from resnet_jax.analysis import layer_responses
    from resnet_jax.data import on_device, pipeline, pixel_mean
    from resnet_jax.run import checkpoint, paths, validate
    from resnet_jax.training import evaluation, steps

    validate.check_numbers(config)
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    evaluation.eval_batch_size(config, log=True)
    info = (on_device if on_device.enabled(config.data) else pipeline).info(config.data)
    model = steps.create_model(config, info.num_classes)
    step = None
    if weights:
        try:
            convert.from_torchvision(model, convert.read_weights(weights))
        except (ValueError, OSError) as error:
            raise ValueError(f"--weights: {validate.one_line(error)}") from error
    else:
        manager = reader(paths.resolve(workdir))
        step, restored = read_checkpoint(manager, which, replicated)
        model = layer_responses.with_weights(model, checkpoint.pure(restored))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    pixel_mean.load(config, paths.resolve(workdir) if workdir else None)
    eval_fn = evaluation.eval_function(nnx.graphdef(model), config, mesh)
    return step, evaluation.evaluate(eval_fn, jax.device_put(Weights(params, rest), replicated), config, mesh)


# This command's flags beside --config: (name, help); --checkpoint's default is "latest".
_FLAGS = (("workdir", "The run whose checkpoint is evaluated."),
          ("checkpoint", f"Which of its checkpoints: {CHECKPOINTS}."),
          ("weights", "A torchvision .pth or .safetensors file of weights to evaluate instead of a "
                      "checkpoint (with --config)."),
          ("json", "Also write the metrics to this file, as JSON."))


def _define_flags(argv: list[str]) -> None:
    if any(arg in config_help.HELP for arg in argv[1:]):
        flags_help = "\n".join(f"--{name}: {about}" for name, about in _FLAGS)
        sys.stdout.write(f"{__doc__.strip()}\n\n{flags_help}\n--config=NAME|PATH[:ARG], "
                         f"--config.SECTION.FIELD=VALUE: as the main job's (python -m "
                         f"resnet_jax.main --config=NAME --help lists a config's fields)\n")
        sys.exit(0)
    try:
        config = _base_config(argv)
    except Exception as error:
        _fail(" ".join(str(error).split()))
    # --config=NAME chose the config above; the flag below takes its --config.FIELD overrides.
    argv[:] = [a for a in argv if not a.startswith("--config=")]
    try:
        config_flags.DEFINE_config_dict("config", config, "The config to evaluate with.",
                                        lock_config=True)
    except Exception as error:
        _fail(config_files.unknown_field(config, argv) or " ".join(str(error).split()))
    for name, about in _FLAGS:
        flags.DEFINE_string(name, "latest" if name == "checkpoint" else None, about)
    sharding.define_flags()


def _parse(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
    except Exception as error:
        _fail(config_files.unknown_field(flags.FLAGS["config"].value, argv)
              or " ".join(str(error).split()))
    if len(rest) > 1:
        _fail(f"unexpected arguments: {' '.join(rest[1:])}")
    f = flags.FLAGS
    if f.weights and f["checkpoint"].present:
        _fail("--weights and --checkpoint name two things to evaluate: give one")
    if not f.weights and not f.workdir:
        _fail("--workdir (a run to evaluate) is required, or --weights with --config")
    return rest


def main(argv: list[str]) -> None:
    del argv
    console.setup()
    sharding.initialize_from_flags()
    import jax  # pylint: disable=import-outside-toplevel

    from resnet_jax.run import checkpoint, paths

    # A failed read's tensorstore reads end in orbax's closed event loop: no tracebacks of theirs.
    sys.unraisablehook = checkpoint.quiet_closed_loop(sys.unraisablehook)
    f = flags.FLAGS
    try:
        with jax.thread_guard(True):
            step, scores = evaluate(f.config, f.workdir, f.checkpoint, f.weights)
    except ValueError as error:  # CorruptCheckpoint and StepDeleted among them
        _fail(" ".join(str(error).split()))
    except SavingTooFast as error:
        print(f"resnet_jax: error: {error}", file=sys.stderr)
        sys.exit(SAVING_TOO_FAST_STATUS)
    finally:
        console.close()
    interrupt.done()  # evaluated: what is left is the output, written whole
    which = "" if f.checkpoint.isdigit() else f" ({f.checkpoint})"
    what = f.weights or f"step {step}{which} of {f.workdir}"
    line = " ".join(f"{k}={v:.6g}" for k, v in scores.items())
    if jax.process_index() == 0:
        print(f"{line}  [{what}; {f.config.data.name} {f.config.data.eval_split} split, "
              f"eval_preprocess={f.config.data.eval_preprocess}]")
        if f.json:
            paths.write_text(paths.resolve(f.json), json.dumps({"step": step, **scores}) + "\n")


if __name__ == "__main__":
    _define_flags(sys.argv)
    app.run(main, flags_parser=_parse)
