"""The training loop: TrainState, train_step, eval_step and train_and_evaluate(config, workdir).

The model is split once into a graph definition and its state; the steps are pure functions of
(state, batch) under `jax.jit`, with the batch sharded over the mesh, the state
replicated and donated (docs/design.md). Every JAX operation is issued from the main thread, in
the same order on every process.
"""

import bisect
import contextlib
import dataclasses
import functools
import io
import itertools
import math
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import multihost_utils
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

from resnet_jax import flops, models
from resnet_jax.data import device_inputs, on_device, pipeline, preprocess
from resnet_jax.distributed import sharding
from resnet_jax.run import checkpoint, console, lock, paths, validate
from resnet_jax.training import fine_tune, interrupt, metrics, optim, running_stats


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    # The train metrics since the last log line and the steps skipped so far: in the state, so
    # that a resumed run writes the rows an uninterrupted one would.
    train_metrics: metrics.TrainMetrics
    skipped: jax.Array
    # Whether the warm-up of schedule.warmup_until_error is over (Sec. 4.2: lr 0.01 until the
    # training error is below 80%): in the state, so that a resumed run keeps the rate it had.
    # True where there is no such warm-up; the default, for states made outside the loop.
    warmed_up: jax.Array = True
    # Ghost BN's per-device running statistics (`running_stats.per_device`), in checkpoints only:
    # a resumed run takes them back and continues bit-exactly (`for_training`). None otherwise.
    device_stats: Any = None


def model_options(config: Any) -> dict[str, Any]:
    """The `model` section less the name: the overrides `models.create` takes."""
    return {k: v for k, v in config.model.items() if k not in ("name", "init_from")}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Softmax cross-entropy per example, in float32; label smoothing (Szegedy et al. 2016) an option."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


# What train_step reports of each step besides the new state.
HEALTH = ("loss", "gradients", "labels")


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
               label_smoothing: float, skip_nonfinite: bool, state: TrainState,
               batch: dict[str, jax.Array], *, warmup_lr: float | None = None):
    """One SGD step. Also returns its health: is the loss finite, is each gradient, are the labels
    in range. With `skip_nonfinite` a step whose loss or gradients are not finite changes nothing
    but the step counter. `warmup_lr`: the rate until `state.warmed_up`, the warm-up of
    schedule.warmup_until_error (Sec. 4.2; `optim.rate_in_use`); None where there is none."""
    def loss_fn(params, batch_stats):
        # A fresh copy inside the differentiated function, so that BN may update its statistics.
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits = model(batch["image"])
        losses = cross_entropy(logits, batch["label"], label_smoothing)
        return losses.mean(), (losses, logits, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (losses, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    rate = schedule(state.step)
    if warmup_lr is not None:
        # The SGD chain applies the schedule's rate last, after momentum (as Caffe's SGD does),
        # so its update scaled by used / rate is the step at the rate used (validate allows no
        # other optimizer with this warm-up).
        used = optim.rate_in_use(schedule, state.step, state.warmed_up, warmup_lr)
        updates = jax.tree.map(lambda u: u * (used / rate).astype(u.dtype), updates)
        rate = used
    new_state = state.replace(params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    # The first non-finite gradient element over all leaves, in one reduction (-1 if none); the
    # host names the leaf. The leaves are joined first and checked once: checked one by one, each
    # leaf's check was a loop fusion that XLA's CPU backend compiled into a kernel of its own
    # (benchmarks/README.md counts them).
    bad = lax.bitwise_not(lax.is_finite(jnp.concatenate(
        [g.reshape(g.size) for g in jax.tree.leaves(grads)])))
    first_bad = jnp.argmax(bad)
    health = {"loss": jnp.isfinite(loss),
              "gradients": jnp.where(bad[first_bad], first_bad, -1),
              "labels": ((batch["label"] >= 0) & (batch["label"] < logits.shape[-1])).all()}
    finite = health["loss"] & (health["gradients"] < 0)
    if skip_nonfinite:
        # (optax's schedule count goes back too: a skipped step holds the schedule back by one.)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    # A skipped step counts in no average.
    step_metrics = metrics.TrainMetrics.single_from_model_output(
        loss=losses, accuracy=jnp.argmax(logits, -1) == batch["label"],
        learning_rate=jnp.full(losses.shape, rate),
        mask=jnp.broadcast_to(finite, losses.shape))
    return new_state.replace(step=state.step + 1, train_metrics=state.train_metrics.merge(step_metrics),
                             skipped=state.skipped + (~finite).astype(jnp.int32)), health


def _scores(probs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per example: the loss of the (averaged) softmax, its top-1 and top-5 hits."""
    mine = jnp.take_along_axis(probs, labels[:, None], -1)
    # The label's rank, ties going to the lower class as in lax.top_k: the top-5 hits without a
    # sort, which XLA partitions by gathering the whole batch onto every device.
    lower = jnp.arange(probs.shape[-1]) < labels[:, None]
    rank = ((probs > mine) | ((probs == mine) & lower)).sum(-1)
    return dict(loss=-jnp.log(mine[:, 0] + 1e-12), accuracy=jnp.argmax(probs, -1) == labels,
                top5_accuracy=rank < 5)


def eval_step(graphdef: nnx.GraphDef, state: TrainState, batch: dict[str, jax.Array]):
    """Loss and top-1/top-5 accuracy of the unmasked examples.

    A batch of crops, (batch, crops, H, W, C), is scored by the mean of the crops' softmax: the
    paper's 10-crop testing (Sec. 3.4).
    """
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    images = batch["image"]
    if images.ndim == 5:
        logits = model(images.reshape((-1,) + images.shape[2:]))
        probs = jax.nn.softmax(logits).reshape(images.shape[:2] + logits.shape[-1:]).mean(1)
    else:
        probs = jax.nn.softmax(model(images))
    return metrics.EvalMetrics.single_from_model_output(**_scores(probs, batch["label"]),
                                                        mask=batch["mask"])


def multi_scale_step(graphdef: nnx.GraphDef, variables, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Sec. 3.4's multi-scale testing: "we adopt the fully-convolutional form ... and average the
    scores at multiple scales". `batch["views"]` holds one (batch, h, w, C) array per scale, the
    whole images resized (`preprocess.multi_scale_fn`); each view and its horizontal flip go
    through the network, whose global average pooling takes any size, and each image's softmax
    is averaged over its 2 x scales views. `variables` is (params, batch_stats).

    Returns per-example scores, nothing reduced over the batch: the step has no collective, so
    that it can run on one process's devices alone (`evaluate`).
    """
    model = nnx.merge(graphdef, *variables)
    probs = 0.0
    for view in batch["views"]:
        # (batch, 2, h, w, C) flattened: each image's flip stays on its device.
        both = jnp.stack([view, jnp.flip(view, 2)], 1).reshape((-1,) + view.shape[1:])
        probs = probs + jax.nn.softmax(model(both)).reshape(view.shape[0], 2, -1).sum(1)
    return _scores(probs / (2 * len(batch["views"])), batch["label"])


def with_inputs(step: Callable, data_config: Any) -> Callable:
    """step(state, batch) taking the batch as the host sends it: made into the network's input
    inside the same jitted program (`device_inputs`)."""
    normalise = device_inputs.normaliser(data_config)
    return lambda state, batch: step(state, normalise(batch))


def create_model(config: Any, num_classes: int) -> nnx.Module:
    return models.create(config.model.name, num_classes=num_classes, rngs=nnx.Rngs(config.seed),
                         **model_options(config))


def for_training(state: TrainState, mesh, bn_group_size: int | None) -> TrainState:
    """The state as the train step takes it: with ghost BN (`bn_group_size`), the running
    statistics kept per device, so that the step needs no collective for them (`running_stats`);
    those a checkpoint saved where it was saved on as many devices."""
    if bn_group_size is None:
        return state
    saved = None if state.device_stats is None else checkpoint.pure(state.device_stats)
    return state.replace(batch_stats=running_stats.resume(state.batch_stats, saved, mesh),
                         device_stats=None)


def for_evaluation(state: TrainState, mesh, bn_group_size: int | None) -> TrainState:
    """The state as evaluation takes it: `for_training` undone, the per-device running
    statistics averaged."""
    if bn_group_size is None:
        return state
    return state.replace(batch_stats=running_stats.gather(state.batch_stats, mesh))


def for_checkpoint(settled: TrainState, state: TrainState, bn_group_size: int | None) -> TrainState:
    """What a checkpoint holds: the state as evaluation takes it (`settled`), and with ghost BN
    also the per-device statistics of the training `state`, for `for_training` to take back."""
    if bn_group_size is None:
        return settled
    return settled.replace(device_stats=running_stats.per_device(state.batch_stats))


def restore_target(state: TrainState, mesh) -> Callable[[dict], dict]:
    """What `checkpoint.restore_latest` restores a step onto, from the step's metadata: `state`'s
    fields as a dict, with `device_stats` in the shapes the checkpoint holds (saved on any device
    count, replicated: they are small), or without it where the checkpoint predates the field."""
    def target(saved: dict) -> dict:
        fields = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
        del fields["device_stats"]
        if "device_stats" in saved:
            fields["device_stats"] = jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                  sharding=sharding.replicated(mesh)),
                saved["device_stats"])
        return fields
    return target


def in_device_memory(config: Any) -> bool:
    """data.on_device: the train split in device memory, batches made inside the step."""
    return bool(config.data.get("on_device", False))


def load_pixel_mean(config: Any, workdir: epath.Path | None) -> None:
    """The per-pixel mean image of Sec. 3.4 ("the per-pixel mean subtracted", from AlexNet) and
    4.2, made once per workdir and the same on every process, for `data` to subtract
    (`data.use_pixel_mean`). Process 0 looks for WORKDIR/pixel_mean_<digest>.npy and broadcasts
    what it finds, so every process takes the same branch and holds the same image; where there
    is none, each process sums its own slice of the training split, the sums are all-gathered and
    combined alike on every process, and process 0 writes the file (whole: `workdir.write_bytes`).
    workdir=None: made, and kept nowhere.

    The mean is of the whole training images each resized to image_size x image_size, and is
    subtracted from every crop (train and eval, whatever the preprocessing) and, resized, from
    every multi-scale view. The paper's Caffe models subtract the matching region of a mean image
    of 256 x 256 images instead, which differs from it by the images' borders' share of it.
    """
    if not config.data.get("subtract_pixel_mean", False) or in_device_memory(config):
        return  # data.on_device makes its own (device_data.pixel_mean)
    path = workdir / pipeline.pixel_mean_file(config.data) if workdir else None
    size = preprocess.settings(config.data).image_size
    first = jax.process_index() == 0 and path is not None
    stored = first and path.exists()
    mean = np.load(io.BytesIO(path.read_bytes())) if stored else np.zeros((size, size, 3), np.float32)
    several = jax.process_count() > 1
    if several and bool(multihost_utils.broadcast_one_to_all(np.int32(stored))):
        stored, mean = True, np.asarray(multihost_utils.broadcast_one_to_all(mean))
    if stored:
        logging.info("Per-pixel mean image read from %s", path)
    else:
        total, count = pipeline.pixel_mean_sums(config.data, jax.process_index(), jax.process_count())
        part = np.concatenate([(total / max(count, 1)).ravel(), [count]]).astype(np.float32)
        parts = np.asarray(multihost_utils.process_allgather(part)) if several else part[None]
        counts = parts[:, -1].astype(np.float64)
        mean = (parts[:, :-1].astype(np.float64) * counts[:, None]).sum(0) / max(counts.sum(), 1)
        mean = mean.astype(np.float32).reshape(size, size, 3)
        if first:
            buffer = io.BytesIO()
            np.save(buffer, mean)
            paths.write_bytes(path, buffer.getvalue())
        logging.info("Per-pixel mean image made from %d training images%s", int(counts.sum()),
                     f" (process 0 writes {path})" if path else "")
    pipeline.use_pixel_mean(config.data, mean)


def multi_scale(config: Any) -> bool:
    return preprocess.settings(config.data).eval_preprocess == "multi_scale"


def eval_batch_size(config: Any, log: bool = False):
    """Images per process in an eval step; for multi_scale, one size per shape class.
    `eval.batch_size` counts network inputs of image_size^2 pixels, so that a step of any
    protocol holds about as much memory: `center` and `none` take that many images, `ten_crop` a
    tenth as many (10 crops each), `multi_scale` as many as fit in them with their views at every
    scale and flips (`preprocess.multi_scale_batch_sizes`), at least one per device. Then rounded
    up to a multiple of the devices and processes (multi_scale: of this process's devices, where
    its steps run): the padding is masked, so any positive size works on any device count.
    log=True says so in the log (once, at the start)."""
    size = config.eval.batch_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"eval.batch_size must be a positive integer; got {size!r}")
    s, processes = preprocess.settings(config.data), jax.process_count()
    if s.eval_preprocess == "multi_scale":
        devices = jax.local_device_count()
        sizes = preprocess.multi_scale_batch_sizes(s, size / processes, devices)
        if log:  # first_n: setup may run more than once in a process
            logging.log_first_n(
                logging.INFO, "Eval steps of multi_scale hold %d to %d images per process (2:1 "
                "to square; a multiple of its %d devices) for eval.batch_size=%d, each image %.3g "
                "to %.3g inputs at its %d scales and flips; the padding is masked out of the "
                "metrics", 1, min(sizes), max(sizes), devices, size,
                preprocess.multi_scale_inputs(s, 0),
                preprocess.multi_scale_inputs(s, preprocess.MAX_ASPECT_STEP), len(s.eval_scales))
        return sizes
    crops = 10 if s.eval_preprocess == "ten_crop" else 1
    images, multiple = -(-size // crops), math.lcm(jax.device_count(), processes)
    per_process = -(-images // multiple) * multiple // processes
    if log and per_process * processes * crops != size:
        logging.log_first_n(
            logging.INFO, "Eval steps hold %d images%s for eval.batch_size=%d (a multiple of the "
            "%d devices and %d processes); the padding is masked out of the metrics", 1,
            per_process * processes, f" of {crops} crops" if crops > 1 else "", size,
            jax.device_count(), processes)
    return per_process


def eval_function(graphdef: nnx.GraphDef, config: Any, mesh) -> Callable:
    """The jitted eval step for `config`'s data: `eval_step` over the mesh, or for multi_scale
    `multi_scale_step` over this process's devices (`local_mesh`)."""
    data_config = config.data
    if in_device_memory(config) or not multi_scale(config):
        normalise = (on_device.eval_normaliser(data_config) if in_device_memory(config)
                     else device_inputs.normaliser(data_config))
        return jax.jit(lambda state, batch: eval_step(graphdef, state, normalise(batch)),
                       in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                       out_shardings=sharding.replicated(mesh))
    normalise, local = device_inputs.normaliser(data_config), local_mesh()

    def step(variables, batch):
        views = tuple(normalise({"image": view})["image"] for view in batch["views"])
        return multi_scale_step(graphdef, variables, {**batch, "views": views})

    return jax.jit(step, in_shardings=(sharding.replicated(local), sharding.batch_sharding(local)),
                   out_shardings=sharding.batch_sharding(local))


def local_mesh():
    """This process's devices: where multi-scale steps run."""
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), (sharding.DATA_AXIS,))


def _evaluate_multi_scale(eval_fn, state: TrainState, config: Any) -> dict[str, float]:
    """Multi-scale testing (Sec. 3.4). Images are batched by shape class as they come, which
    differs from process to process, so each process runs its steps on its own devices: the steps
    hold no collective, and nothing another process waits for. The sums are added over the
    processes once at the end, in the same place on every process; each example counts once."""
    local = local_mesh()
    variables = jax.tree.map(  # this process's copy of the replicated parameters
        lambda x: jax.device_put(x.addressable_data(0), sharding.replicated(local)),
        (state.params, state.batch_stats))
    outputs = []
    batches = _EvalPass(pipeline.multi_scale_iterator(config.data, batch_sizes=eval_batch_size(config),
                                                  process_index=jax.process_index(),
                                                  process_count=jax.process_count()))
    for batch in batches:
        mask = batch.pop("mask")
        del batch["aspect"]
        outputs.append((eval_fn(variables, jax.device_put(batch, sharding.batch_sharding(local))),
                        mask))
    batches.agree()
    sums = np.zeros(4)  # loss, top-1 hits, top-5 hits, examples
    for scores, mask in outputs:
        scores = jax.device_get(scores)
        sums += [scores["loss"][mask].sum(), scores["accuracy"][mask].sum(),
                 scores["top5_accuracy"][mask].sum(), mask.sum()]
    if jax.process_count() > 1:
        sums = np.asarray(multihost_utils.process_allgather(sums.astype(np.float32))).sum(0)
    return metrics.prefixed("eval", dict(loss=sums[0] / sums[3], accuracy=sums[1] / sums[3],
                                         top5_accuracy=sums[2] / sums[3]))


def evaluate(eval_fn, state: TrainState, config: Any, mesh) -> dict[str, float]:
    if multi_scale(config):
        return _evaluate_multi_scale(eval_fn, state, config)
    source = on_device if in_device_memory(config) else pipeline
    batches = source.eval_iterator(
        config.data, batch_size=eval_batch_size(config),
        process_index=jax.process_index(), process_count=jax.process_count())
    total = None
    batches = _EvalPass(sharding.prefetch(batches, mesh))
    for batch in batches:
        step_metrics = eval_fn(state, batch)
        total = step_metrics if total is None else total.merge(step_metrics)
    batches.agree()
    return metrics.prefixed("eval", total.compute())


class _EvalPass:
    """An eval pass's batches, and its `BadImageError` (raised by a process's pass after its
    last batch, so that the processes stay in step) agreed on by every process: `agree`, after
    the pass and before anything else across the processes, raises on all where one met any.
    A pass that takes a while says how far it got: after `FIRST` seconds, then every `EVERY`."""

    FIRST, EVERY = 5.0, 30.0

    def __init__(self, batches: Iterable[Any]):
        self._batches, self._error = batches, None

    def __iter__(self) -> Iterator[Any]:
        began = time.perf_counter()
        due = began + self.FIRST
        try:
            for done, batch in enumerate(self._batches):
                yield batch
                if (now := time.perf_counter()) > due:
                    due = now + self.EVERY
                    logging.info("Evaluating: %d batches in %.0f s", done + 1, now - began)
        except pipeline.BadImageError as error:
            self._error = error

    def agree(self) -> None:
        error = self._error
        if jax.process_count() > 1:
            failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
            if error is None and failed.any():
                error = pipeline.BadImageError(f"the eval images of process {int(failed.argmax())} "
                                           f"include some that do not decode (its own line "
                                           f"names them)")
        if error is not None:
            raise error


def total_steps(config: Any, steps_per_epoch: int) -> int:
    if config.train.num_steps > 0:
        return config.train.num_steps
    return math.ceil(config.train.num_epochs * steps_per_epoch)


class Preempted(Exception):
    """The run was asked to stop (SIGTERM: preemption; SIGINT: Ctrl-C), saved its step and
    stopped; the same command resumes it. `status` is the exit status that says so."""

    def __init__(self, step: int, status: int):
        super().__init__(f"stopped at step {step} and saved it; the same command resumes")
        self.step, self.status = step, status


PREEMPTED_STATUS = 75  # EX_TEMPFAIL, "try again": `launch/slurm.sbatch` requeues on it
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report Ctrl-C


class _Preemption:
    """SIGTERM or a first Ctrl-C asks the run to save and stop at the next step; a second Ctrl-C
    exits at once.

    One process: the signal sets a flag that the loop reads between steps. Several processes:
    JAX's preemption notifier (installed by jax.distributed) catches SIGTERM and tells the other
    processes; `checkpoint.reached_preemption` then stops every process at the same step. No
    SIGTERM handler of ours may replace JAX's, so there a Ctrl-C is passed on to it as a SIGTERM.
    """

    def __init__(self):
        self.status = None
        self._several = jax.process_count() > 1
        interrupt.check()  # a Ctrl-C since the lock was taken: stop now, saving nothing
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt)}
        if not self._several:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame):
        self.status = self.status or PREEMPTED_STATUS

    def _interrupt(self, signum, frame):
        if self.status == INTERRUPTED_STATUS:
            print("resnet_jax: interrupted again: exiting without saving", file=sys.stderr)
            os._exit(INTERRUPTED_STATUS)  # at once: no wait for the save in flight
        self.status = INTERRUPTED_STATUS
        print("resnet_jax: interrupted: saving the current step, then exiting (Ctrl-C again "
              "exits at once)", file=sys.stderr)
        if self._several:
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, manager, step: int) -> bool:
        if self._several:
            return checkpoint.reached_preemption(manager, step)
        return self.status is not None

    def exit_status(self) -> int:
        # Several processes: a SIGTERM to any one of them stops them all.
        return self.status or PREEMPTED_STATUS

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
    info: pipeline.DataInfo
    steps_per_epoch: int
    num_steps: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    model: nnx.Module  # models.ResNet or vgg.VGG


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
        try:  # data.num_classes is checked against the data set's by `info` below
            model = create_model(config, config.data.num_classes)
        except (ValueError, TypeError) as error:  # its messages name the field inside `model`
            raise validate.SetupError(f"model: {validate.one_line(error)}") from error
        if in_device_memory(config):
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
        if config.model.get("init_from"):
            _start_from(model, config.model.init_from)
        validate.check_image_size(info.image_shape[0], model.total_stride, config.model.name)
        path = paths.resolve(workdir)
        validate.check_workdir(path, config.to_json_best_effort(), allow_config_change)
    except (ValueError, FileNotFoundError) as error:  # not TypeError etc.: a bug is no bad input
        raise validate.SetupError(validate.one_line(error)) from error
    return Setup(path, mesh, batch_size, info, steps_per_epoch, num_steps, schedule, tx, model)


def _check_config(config: Any) -> None:
    """The config's own values, checked before anything they name (a data set, a file) is looked
    at: a bad value is reported first, not after its user has fixed the data (the model's are
    checked as `setup` builds it, before the data too)."""
    validate.check_numbers(config)
    eval_batch_size(config, log=True)
    validate.check_bn_groups(config.model.bn_group_size, config.train.batch_size, jax.device_count())
    schedule = optim.learning_rate_schedule(config.schedule, 1, config.train.batch_size,
                                            max(config.train.num_steps, 1))
    optim.create_optimizer(config.optimizer, schedule)


def train_and_evaluate(config: Any, workdir: str, allow_config_change: bool = False,
                       restart: bool = False) -> TrainState:
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


def _train_and_evaluate(run: Setup, config: Any, restart: bool) -> TrainState:
    workdir, mesh, info, num_steps, schedule, tx, model = (
        run.workdir, run.mesh, run.info, run.num_steps, run.schedule, run.tx, run.model)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", _in_workdir(config.compilation_cache_dir, workdir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    # batch_stats: every variable that is not a parameter. BN's statistics, and in networks with
    # dropout (VGG) its random stream, whose counter each step moves on and checkpoints.
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    replicated = sharding.replicated(mesh)
    until_error = config.schedule.warmup_until_error  # Sec. 4.2's warm-up; 0 for none
    # The metrics window starts (and restarts after each log line) inside jit, so that its
    # arrays are global ones on every process, as orbax needs them.
    empty_window = jax.jit(metrics.TrainMetrics.empty, out_shardings=replicated)
    state = jax.device_put(TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params), train_metrics=empty_window(),
        skipped=jnp.zeros((), jnp.int32), warmed_up=jnp.asarray(not until_error)), replicated)

    manager = checkpoint.create_manager(workdir, config.checkpoint)
    restored = checkpoint.restore_latest(manager, restore_target(state, mesh), workdir, restart)
    start = 0
    if restored is not None:
        state = TrainState(**restored)
        start = int(state.step)
        logging.info("Restored the checkpoint of step %d from %s", start, manager.directory)
    warmed_up = bool(state.warmed_up)  # the host's copy, to test each log window while False
    # The rows of metrics.jsonl after `start` were written by a run that stopped before saving
    # them; this run writes them again.
    writer = metrics.create_writer(workdir, _in_workdir(config.tensorboard_dir, workdir), start)
    group = config.model.bn_group_size
    state = for_training(state, mesh, group)
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)

    macs = flops.count_macs(model, info.image_shape[:2])
    logging.info("Devices: %d (%s), processes: %d; model %s: %s parameters, %s multiply-adds per "
                 "image; global batch %d, %d steps per epoch, %d steps",
                 jax.device_count(), jax.devices()[0].platform, jax.process_count(),
                 config.model.name, f"{flops.count_params(model):,}", f"{macs:,}",
                 config.train.batch_size, run.steps_per_epoch, num_steps)
    if jax.process_index() == 0:
        paths.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))

    load_pixel_mean(config, workdir)
    batch_spec = sharding.batch_sharding(mesh)
    step_fn = functools.partial(train_step, graphdef, tx, schedule, config.train.label_smoothing,
                                config.train.skip_nonfinite,
                                warmup_lr=config.schedule.warmup_lr if until_error else None)
    if in_device_memory(config):
        # The train split in device memory; the step gathers and augments its own batch, a
        # function of (seed, step) alone (device_data.py).
        resident = on_device.place(config.data, mesh)
        make_batch = resident.batch_fn(config.data, config.train.batch_size, config.seed)
        train_fn = jax.jit(lambda state, arrays: step_fn(state, make_batch(arrays, state.step)),
                           in_shardings=(state_shardings, resident.shardings),
                           out_shardings=(state_shardings, replicated), donate_argnums=0)
        batches = itertools.repeat(resident.arrays)
    else:
        train_fn = jax.jit(with_inputs(step_fn, config.data),
                           in_shardings=(state_shardings, batch_spec),
                           out_shardings=(state_shardings, replicated), donate_argnums=0)
        batches = sharding.prefetch(pipeline.train_iterator(
            config.data, batch_size=run.batch_size, seed=config.seed, start_step=start,
            process_index=jax.process_index(), process_count=jax.process_count()), mesh)
    eval_fn = eval_function(eval_graphdef, config, mesh)
    hooks = metrics.profile_hooks(config.profile_steps, str(workdir))
    names = _parameter_names(params)
    preemption = _Preemption()  # before the first batch is fetched: a signal from then on saves
    last_saved = start or None
    # The first window's speed counts the compile, which happens at the first step.
    window = metrics.Window(start, config.train.batch_size,
                            flops.train_flops_per_image(macs) * config.train.batch_size)
    try:
        pending = []
        for step in range(start + 1, num_steps + 1):
            with window.waiting():
                batch = next(batches)
            state, health = train_fn(state, batch)
            pending.append((step, health))
            for hook in hooks:
                hook(step)
            preempted = preemption.reached(manager, step)
            # Every checkpoint.every_steps steps: not orbax's should_save, which also saves the
            # first step of a fresh run (the whole state written before any real work).
            saving = preempted or step == num_steps or step % config.checkpoint.every_steps == 0
            logging_now = step % config.log_every_steps == 0 or step == num_steps
            scalars = {}
            if saving or logging_now:
                _check_health(pending, names, config.train.skip_nonfinite, last_saved)
            if logging_now:
                scalars = metrics.prefixed("train", state.train_metrics.compute())
                scalars.update(window.scalars(step))
                if int(state.skipped):
                    scalars["skipped_steps"] = int(state.skipped)
                state = state.replace(train_metrics=empty_window())
                # Sec. 4.2: the warm-up ends at the first window whose training error is below
                # the threshold. The window's metrics are the same on every process, and so is
                # this test; the next step takes the schedule's rate.
                error = 1 - scalars["train_accuracy"]
                if not warmed_up and error < until_error:
                    warmed_up = True
                    state = state.replace(warmed_up=jax.device_put(jnp.asarray(True), replicated))
                    logging.info("Warm-up over at step %d: training error %.4f below "
                                 "schedule.warmup_until_error=%g; learning rate now %g", step,
                                 error, until_error, float(schedule(step)))
            evaluating = step % config.eval.every_steps == 0 or step == num_steps
            # The per-device BN statistics averaged once for the evaluation and the save alike.
            settled = for_evaluation(state, mesh, group) if evaluating or saving else None
            if evaluating:
                with window.paused():  # the speed counts training time only
                    try:
                        scalars.update(evaluate(eval_fn, settled, config, mesh))
                    except pipeline.BadImageError as error:  # no eval leaves an example out
                        raise TrainingError(f"step {step}: {error}; stopped, "
                                            f"{checkpoint.last_complete(manager)}") from error
            if scalars:
                _write(writer, step, scalars, manager)
            if logging_now:  # after the window's metrics; the log only, not metrics.jsonl
                logging.info("%s", metrics.progress(step, num_steps, scalars,
                                                    compiled=step - config.log_every_steps <= start))
            if saving:
                checkpoint.save(manager, step, for_checkpoint(settled, state, group),
                                metrics=scalars if "eval_accuracy" in scalars else None, force=True,
                                final=step == num_steps)
                logging.info("Saving the checkpoint of step %d", step)
                last_saved = step
            if preempted:
                checkpoint.wait(manager)
                logging.warning("Stopped by a signal: saved the checkpoint of step %d; the same "
                                "command resumes.", step, extra=console.LOG_FILE_ONLY)  # the
                # terminal's last line says it (main.py)
                raise Preempted(step, preemption.exit_status())
        checkpoint.wait(manager)
        _write(writer, num_steps, None, manager)
    finally:
        preemption.restore()
        with contextlib.suppress(Exception):  # after an error: the first error is the one to see
            writer.flush()
        with contextlib.suppress(Exception):  # after an error: let the saves in flight finish
            manager.wait_until_finished()
    return for_evaluation(state, mesh, group)
