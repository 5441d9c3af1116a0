"""The training loop: `train_and_evaluate(config, workdir)` checks the config and workdir
(`setup`), then trains, evaluates and checkpoints the run phase by phase, resuming what is there.

Every JAX operation is issued from the main thread, in the same order on every process; an error
one process meets alone is agreed on by all before any raises (`_write`).
"""

import bisect
import contextlib
import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from absl import logging
from etils import epath
from flax import nnx

from resnet_jax import flops
from resnet_jax.data import on_device, pipeline, pixel_mean, sources
from resnet_jax.distributed import sharding
from resnet_jax.run import checkpoint, console, lock, paths, validate
from resnet_jax.training import (ema, evaluation, fine_tune, interrupt, losses, metrics, mixing,
                                 optim, preemption, steps, warmup, writers)


def total_steps(config: Any, steps_per_epoch: int) -> int:
    if config.train.num_steps > 0:
        return config.train.num_steps
    return math.ceil(config.train.num_epochs * steps_per_epoch)


def _in_workdir(path: str, workdir) -> str:
    """A config's directory, "{workdir}" replaced."""
    return path.replace("{workdir}", str(workdir))


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite values, bad labels, a failed save); the last good
    checkpoint is kept."""


def _parameter_names(params: nnx.State) -> list[tuple[str, int]]:
    """('stages.1.0.conv1.kernel', index one past its last element in all the leaves raveled and
    joined) for each leaf, in the order of jax.tree.leaves."""
    def name(path):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        return ".".join(k for k in keys if k != "value")
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(params))
    return list(zip(map(name, paths), np.cumsum([leaf.size for leaf in leaves]).tolist()))


def _check_health(pending: list, names: list[tuple[str, int]], skip_nonfinite: bool,
                  last_saved: int | None) -> None:
    """Reads the health of the steps since the last check; raises TrainingError on a bad one.

    Read in batches, not every step, so that the host does not wait on each step.
    """
    for step, health in jax.device_get(pending):
        kept = f"the checkpoint of step {last_saved} is kept" if last_saved else "no checkpoint was made"
        if not health["labels"]:
            raise TrainingError(f"step {step}: a label is outside [0, num_classes); stopped, {kept}")
        if skip_nonfinite or (health["loss"] and health["gradients"] < 0):
            continue
        ends = [end for _, end in names]
        what = "loss" if not health["loss"] else \
            f"gradient of {names[bisect.bisect_right(ends, int(health['gradients']))][0]}"
        raise TrainingError(f"step {step}: non-finite {what}; stopped, {kept} "
                            f"(train.skip_nonfinite=True skips such steps)")
    pending.clear()


def _write(writer, step: int, scalars: dict[str, float] | None, manager) -> None:
    """Writes a row of scalars (None: flushes); a failure (a full disk: an OSError, TensorFlow's
    ResourceExhaustedError, which is none) is a TrainingError naming what is left. So is a log
    file that could not be written since the last call (`console.failure`). Every process calls
    it at the same steps and decides alike: a failure on any one stops them all."""
    failure, cause = console.failure(), None
    if failure is None:
        try:
            if scalars is None:
                writer.flush()
            else:
                writer.write_scalars(step, scalars)
        except Exception as error:
            failure, cause = (f"writing the metrics of step {step} failed ({type(error).__name__}: "
                              f"{validate.one_line(error)})"), error
    if jax.process_count() > 1:  # process 0 alone writes metrics.jsonl; each its own log file
        failed = np.asarray(multihost_utils.process_allgather(np.int32(failure is not None)))
        if failure is None and failed.any():
            failure = (f"process {int(failed.argmax())} could not write its metrics or log file at "
                       f"step {step} (its own line says why)")
    if failure is not None:
        raise TrainingError(f"{failure}; {checkpoint.last_complete(manager)}") from cause


@dataclasses.dataclass
class Setup:
    """What a run needs before its first step, made from a config that has passed every check."""
    workdir: epath.Path
    mesh: Any
    batch_size: int          # per process
    info: sources.DataInfo
    steps_per_epoch: int
    num_steps: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    model: nnx.Module  # models.ResNet or vgg.VGG
    loss: losses.Loss
    mixing: mixing.Mixing | None  # None: no batch is mixed
    average: ema.EMA | None       # None: no moving average of the weights


def _start_from(model: nnx.Module, path: str) -> None:
    """Fine-tuning: the weights of a torchvision `.pth`, a `.safetensors` file or another run's
    workdir in `model` (fine_tune.py); a checkpoint of this run restored later replaces them."""
    try:
        changes = fine_tune.start_from(model, paths.resolve(path))
    except (ValueError, OSError) as error:  # WorkdirError is a ValueError
        raise validate.SetupError(f"model.init_from: {validate.one_line(error)}") from error
    logging.info("Starting from the weights of %s%s", path, "".join(f"; {c}" for c in changes))


def setup(config: Any, workdir: str, allow_config_change: bool = False) -> Setup:
    """Checks the config and workdir and builds the run's parts; writes nothing but the workdir
    itself. Any problem raises `validate.SetupError`, one line, on every process alike."""
    # First, before any check that could fail on some processes only and leave the others
    # waiting: every process of a run must have been given the same command.
    if not sharding.same_on_every_process(f"{config.to_json_best_effort()} {workdir}"):
        raise validate.SetupError("the processes of this run were given different configs or "
                                  "workdirs; every process must run the same command")
    try:
        mesh = sharding.make_mesh()
        batch_size = sharding.per_process_batch(config.train.batch_size, "train.batch_size")
        _check_config(config)
        loss, mix = losses.from_config(config.train), mixing.from_config(config.train, config.seed)
        try:  # data.num_classes is checked against the data set's by `info` below
            model = steps.create_model(config, config.data.num_classes)
        except (ValueError, TypeError) as error:  # its messages name the field inside `model`
            raise validate.SetupError(f"model: {validate.one_line(error)}") from error
        if on_device.enabled(config.data):
            info = on_device.info(config.data)
        elif pipeline.tf is None or pipeline.tfds is None:
            raise validate.SetupError(
                "data.on_device=False reads data through tf.data, which needs tensorflow and "
                "tensorflow-datasets (not installed): install them, or set data.on_device=True "
                f"({on_device.SUPPORTED})")
        else:
            info = pipeline.info(config.data)
        steps_per_epoch = info.num_train // config.train.batch_size
        if steps_per_epoch < 1:
            raise validate.SetupError(f"train.batch_size must be at most the {info.num_train} training "
                                      f"examples; got {config.train.batch_size}")
        if info.num_eval < 1:
            raise validate.SetupError(f"data.eval_split={config.data.eval_split!r} has no examples")
        num_steps = total_steps(config, steps_per_epoch)
        schedule = optim.learning_rate_schedule(config.schedule, steps_per_epoch,
                                                config.train.batch_size, num_steps)
        tx = optim.create_optimizer(config.optimizer, schedule)
        average = _ema(config, steps_per_epoch, num_steps)
        if config.model.get("init_from"):
            _start_from(model, config.model.init_from)
        validate.check_image_size(info.image_shape[0], model.total_stride, config.model.name)
        path = paths.resolve(workdir)
        validate.check_workdir(path, config.to_json_best_effort(), allow_config_change)
    except (ValueError, FileNotFoundError) as error:  # not TypeError etc.: a bug is no bad input
        raise validate.SetupError(validate.one_line(error)) from error
    return Setup(path, mesh, batch_size, info, steps_per_epoch, num_steps, schedule, tx, model,
                 loss, mix if mix.enabled else None, average)


def _check_config(config: Any) -> None:
    """The config's own values, checked before anything they name (a data set, a file) is looked
    at: a bad value is reported first, not after its user has fixed the data (the model's are
    checked as `setup` builds it, before the data too)."""
    validate.check_numbers(config)
    evaluation.eval_batch_size(config, log=True)
    validate.check_bn_groups(config.model.bn_group_size, config.train.batch_size, jax.device_count())
    schedule = optim.learning_rate_schedule(config.schedule, 1, config.train.batch_size,
                                            max(config.train.num_steps, 1))
    optim.create_optimizer(config.optimizer, schedule)
    if config.train.ema_decay and config.model.bn_group_size is not None:
        raise ValueError(f"train.ema_decay needs BN over the whole batch: model.bn_group_size must "
                         f"be None (the config's argument bn=global); got {config.model.bn_group_size}")


def train_and_evaluate(config: Any, workdir: str, allow_config_change: bool = False,
                       restart: bool = False) -> steps.TrainState:
    """Trains `config`'s model, evaluates and checkpoints it in `workdir`; resumes what is there.

    Raises `Preempted` after saving when SIGTERM or SIGINT asked the run to stop. `restart`:
    start from step 0 where no checkpoint can be restored (`checkpoint.restore_latest`). The
    run holds the workdir (`lock`): another run on it is refused.
    """
    run = setup(config, workdir, allow_config_change)
    # Ctrl-C from here raises, so that the lock is released and the log kept.
    with interrupt.raising(), lock.held(run.workdir):
        console.keep_log(run.workdir, jax.process_index())  # the input has passed every check
        return _train_and_evaluate(run, config, restart)


def _train_and_evaluate(run: Setup, config: Any, restart: bool) -> steps.TrainState:
    """The run, phase by phase: the state (restored where a checkpoint is), the jitted steps and
    their data, then each step trained and, when due, the log window closed, the network
    evaluated, the row written and the state saved."""
    mesh, group, num_steps = run.mesh, config.model.bn_group_size, run.num_steps
    replicated = sharding.replicated(mesh)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", _in_workdir(config.compilation_cache_dir, run.workdir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    manager = checkpoint.create_manager(run.workdir, config.checkpoint)
    # The metrics window starts (and restarts after each log line) inside jit, so that its
    # arrays are global ones on every process, as orbax needs them.
    empty_window = jax.jit(metrics.TrainMetrics.empty, out_shardings=replicated)
    graphdef, state, start = _initial_state(run, config, manager, restart, empty_window)
    eval_fn = evaluation.eval_function(nnx.graphdef(run.model), config, mesh)  # run.model: eval mode
    # The rows of metrics.jsonl after `start` were written by a run that stopped before saving
    # them; this run writes them again.
    writer = writers.create(run.workdir, _in_workdir(config.tensorboard_dir, run.workdir), start)
    macs = _say_what_runs(run, config)
    pixel_mean.load(config, run.workdir)
    train_fn, batches = _train_function(run, config, graphdef, state, start)
    warm_up = warmup.UntilError(config.schedule.warmup_until_error, run.schedule,
                                over=bool(state.warmed_up))
    profile = metrics.profile_hooks(config.profile_steps, str(run.workdir))
    names = _parameter_names(state.params)
    stop = preemption.Preemption()  # before the first batch is fetched: a signal from then on saves
    last_saved = start or None
    # The first window's speed counts the compile, which happens at the first step.
    window = metrics.Window(start, config.train.batch_size,
                            flops.train_flops_per_image(macs) * config.train.batch_size)
    try:
        pending = []  # each step's health, read when a log or a save is due
        for step in range(start + 1, num_steps + 1):
            with window.waiting():
                batch = next(batches)
            state, health = train_fn(state, batch)
            pending.append((step, health))
            for hook in profile:
                hook(step)
            due = _Due.at(step, config, num_steps, stopping=stop.reached(manager, step))
            scalars = {}
            if due.save or due.log:
                _check_health(pending, names, config.train.skip_nonfinite, last_saved)
            if due.log:
                scalars = _close_window(state, step, window)
                state = warm_up.after_window(state.replace(train_metrics=empty_window()), step,
                                             scalars["train_accuracy"], replicated)
            # The per-device BN statistics averaged once for the evaluation and the save alike.
            settled = steps.for_evaluation(state, mesh, group) if due.evaluate or due.save else None
            if due.evaluate:
                with window.paused():  # the speed counts training time only
                    scalars.update(_evaluate(eval_fn, settled, config, mesh, step, manager))
            if scalars:
                _write(writer, step, scalars, manager)
            if due.log:  # after the window's metrics; the log only, not metrics.jsonl
                logging.info("%s", metrics.progress(step, num_steps, scalars,
                                                    compiled=step - config.log_every_steps <= start))
            if due.save:
                checkpoint.save(manager, step, steps.for_checkpoint(settled, state, group),
                                metrics=scalars if "eval_accuracy" in scalars else None, force=True,
                                final=step == num_steps)
                logging.info("Saving the checkpoint of step %d", step)
                last_saved = step
            if due.stop:
                _stopped(manager, step, stop.exit_status())
        checkpoint.wait(manager)
        _write(writer, num_steps, None, manager)
    finally:
        stop.restore()
        with contextlib.suppress(Exception):  # after an error: the first error is the one to see
            writer.close()
        with contextlib.suppress(Exception):  # after an error: let the saves in flight finish
            manager.wait_until_finished()
    return steps.for_evaluation(state, mesh, group)


def _initial_state(run: Setup, config: Any, manager, restart: bool, empty_window):
    """(graphdef, the state as the train step takes it, its step): step 0's, or the latest
    checkpoint's."""
    # model_state: every variable that is not a parameter. BN's statistics, and in networks with
    # dropout (VGG) its random stream, whose counter each step moves on and checkpoints.
    graphdef, params, model_state = nnx.split(run.model, nnx.Param, ...)
    run.model.eval()
    replicated = sharding.replicated(run.mesh)
    state = jax.device_put(steps.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=run.tx.init(params), train_metrics=empty_window(),
        skipped=jnp.zeros((), jnp.int32),
        warmed_up=jnp.asarray(not config.schedule.warmup_until_error),
        ema=run.average.init(params, model_state) if run.average else None), replicated)
    restored = checkpoint.restore_latest(manager, steps.restore_target(state, run.mesh),
                                         run.workdir, restart)
    start = 0
    if restored is not None:
        state = steps.TrainState(**steps.current_names(restored))
        start = int(state.step)
        logging.info("Restored the checkpoint of step %d from %s", start, manager.directory)
        if run.average and state.ema is None:  # a run that kept none: the average starts here
            logging.info("The checkpoint holds no average of the weights: it starts from them")
            state = state.replace(ema=jax.device_put(run.average.init(state.params, state.model_state),
                                                     replicated))
        elif not run.average:
            state = state.replace(ema=None)
    return graphdef, steps.for_training(state, run.mesh, config.model.bn_group_size), start


def _ema(config: Any, steps_per_epoch: int, num_steps: int) -> ema.EMA | None:
    """The run's moving average of the weights, None where it keeps none; its updates copy the
    weights during the schedule's warm-up (`warmup_epochs` or `warmup_steps`)."""
    warmup_steps = int(config.schedule.warmup_epochs * steps_per_epoch) + config.schedule.warmup_steps
    return ema.from_config(config.train, steps_per_epoch, num_steps, warmup_steps)


def _say_what_runs(run: Setup, config: Any) -> int:
    """The log's line on the devices, the network and the steps; process 0 writes config.json.
    Returns the network's multiply-adds per image."""
    macs = flops.count_macs(run.model, run.info.image_shape[:2])
    logging.info("Devices: %d (%s), processes: %d; model %s: %s parameters, %s multiply-adds per "
                 "image; global batch %d, %d steps per epoch, %d steps",
                 jax.device_count(), jax.devices()[0].platform, jax.process_count(),
                 config.model.name, f"{flops.count_params(run.model):,}", f"{macs:,}",
                 config.train.batch_size, run.steps_per_epoch, run.num_steps)
    if jax.process_index() == 0:
        paths.write_text(run.workdir / "config.json", config.to_json_best_effort(indent=2))
    return macs


def _train_function(run: Setup, config: Any, graphdef, state: steps.TrainState, start: int):
    """(the jitted train step, taking (state, batch), and its batches from step `start` on)."""
    mesh, replicated = run.mesh, sharding.replicated(run.mesh)
    until_error = config.schedule.warmup_until_error
    step_fn = functools.partial(steps.train_step, graphdef, run.tx, run.schedule, run.loss,
                                config.train.skip_nonfinite,
                                warmup_lr=config.schedule.warmup_lr if until_error else None,
                                mixing=run.mixing, ema=run.average)
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    if on_device.enabled(config.data):
        # The train split in device memory; the step gathers and augments its own batch, a
        # function of (seed, step) alone (on_device.py).
        resident = on_device.place(config.data, mesh)
        make_batch = resident.batch_fn(config.data, config.train.batch_size, config.seed)
        train_fn = jax.jit(lambda state, arrays: step_fn(state, make_batch(arrays, state.step)),
                           in_shardings=(state_shardings, resident.shardings),
                           out_shardings=(state_shardings, replicated), donate_argnums=0)
        return train_fn, itertools.repeat(resident.arrays)
    train_fn = jax.jit(steps.with_inputs(step_fn, config.data),
                       in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)
    batches = sharding.prefetch(pipeline.train_iterator(
        config.data, batch_size=run.batch_size, seed=config.seed, start_step=start,
        process_index=jax.process_index(), process_count=jax.process_count()), mesh)
    return train_fn, batches


@dataclasses.dataclass(frozen=True)
class _Due:
    """What a step does after training: close the log window, evaluate, save, stop."""
    log: bool
    evaluate: bool
    save: bool
    stop: bool

    @classmethod
    def at(cls, step: int, config: Any, num_steps: int, stopping: bool) -> "_Due":
        last = step == num_steps
        # Every checkpoint.every_steps steps: not orbax's should_save, which also saves the
        # first step of a fresh run (the whole state written before any real work).
        return cls(log=step % config.log_every_steps == 0 or last,
                   evaluate=step % config.eval.every_steps == 0 or last,
                   save=stopping or last or step % config.checkpoint.every_steps == 0,
                   stop=stopping)


def _close_window(state: steps.TrainState, step: int, window: metrics.Window) -> dict[str, float]:
    """The log window's train metrics, speed and skipped steps."""
    scalars = metrics.prefixed("train", state.train_metrics.compute())
    scalars.update(window.scalars(step))
    if int(state.skipped):
        scalars["skipped_steps"] = int(state.skipped)
    return scalars


def _evaluate(eval_fn, settled: steps.TrainState, config: Any, mesh, step: int,
              manager) -> dict[str, float]:
    """The eval metrics of the weights, and of their moving average (`ema_eval_*`) where the
    run keeps one."""
    try:
        scalars = evaluation.evaluate(eval_fn, settled, config, mesh)
        if settled.ema is not None:
            average = steps.Weights(settled.ema.params, settled.ema.model_state)
            scalars.update({f"ema_{name}": value for name, value
                            in evaluation.evaluate(eval_fn, average, config, mesh).items()})
        return scalars
    except sources.BadImageError as error:  # no eval leaves an example out
        raise TrainingError(f"step {step}: {error}; stopped, "
                            f"{checkpoint.last_complete(manager)}") from error


def _stopped(manager, step: int, status: int):
    """After the save of a step a signal asked for: waits for it, then raises Preempted."""
    checkpoint.wait(manager)
    logging.warning("Stopped by a signal: saved the checkpoint of step %d; the same command "
                    "resumes.", step, extra=console.LOG_FILE_ONLY)  # the terminal's last line
    # says it (main.py)
    raise preemption.Preempted(step, status)
