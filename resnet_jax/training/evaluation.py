"""Evaluation as the training loop runs it, shared by the loop, `python -m resnet_jax.evaluate` and
the reports: the eval batch size, the jitted eval function for the data's protocol, and a whole
pass over the eval split, exact on any device and process count (padded batches, masked)."""

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from resnet_jax import convert
from resnet_jax.data import device_inputs, on_device, pipeline, pixel_mean, preprocess, sources
from resnet_jax.distributed import sharding
from resnet_jax.run import checkpoint, live, paths, validate
from resnet_jax.training import metrics, steps


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
    """The jitted eval step for `config`'s data: `steps.eval_step` over the mesh, or for multi_scale
    `steps.multi_scale_step` over this process's devices (`local_mesh`)."""
    data_config = config.data
    if on_device.enabled(config.data) or not multi_scale(config):
        normalise = (on_device.eval_normaliser(data_config) if on_device.enabled(config.data)
                     else device_inputs.normaliser(data_config))
        return jax.jit(lambda state, batch: steps.eval_step(graphdef, state, normalise(batch)),
                       in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                       out_shardings=sharding.replicated(mesh))
    normalise, local = device_inputs.normaliser(data_config), local_mesh()

    def step(variables, batch):
        views = tuple(normalise({"image": view})["image"] for view in batch["views"])
        return steps.multi_scale_step(graphdef, variables, {**batch, "views": views})

    return jax.jit(step, in_shardings=(sharding.replicated(local), sharding.batch_sharding(local)),
                   out_shardings=sharding.batch_sharding(local))


def local_mesh():
    """This process's devices: where multi-scale steps run."""
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), (sharding.DATA_AXIS,))


def _evaluate_multi_scale(eval_fn, state: steps.TrainState, config: Any) -> dict[str, float]:
    """Multi-scale testing (Sec. 3.4). Images are batched by shape class as they come, which
    differs from process to process, so each process runs its steps on its own devices: the steps
    hold no collective, and nothing another process waits for. The sums are added over the
    processes once at the end, in the same place on every process; each example counts once."""
    local = local_mesh()
    variables = jax.tree.map(  # this process's copy of the replicated parameters
        lambda x: jax.device_put(x.addressable_data(0), sharding.replicated(local)),
        (state.params, state.model_state))
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


def evaluate(eval_fn, state: steps.TrainState, config: Any, mesh) -> dict[str, float]:
    if multi_scale(config):
        return _evaluate_multi_scale(eval_fn, state, config)
    source = on_device if on_device.enabled(config.data) else pipeline
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
        except sources.BadImageError as error:
            self._error = error

    def agree(self) -> None:
        error = self._error
        if jax.process_count() > 1:
            failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
            if error is None and failed.any():
                error = sources.BadImageError(f"the eval images of process {int(failed.argmax())} "
                                              f"include some that do not decode (its own line "
                                              f"names them)")
        if error is not None:
            raise error


def evaluate_saved(config: Any, workdir: str | None, which: str = "latest",
                   weights: str | None = None, average: bool = False) -> tuple[int | None, dict[str, float]]:
    """(step, eval metrics) of checkpoint `which` of the run in `workdir` (with `average`, of
    its moving average of the weights, `ema`), or of the torchvision or safetensors file
    `weights` (step None), evaluated as the run evaluates. Raises ValueError
    (one line) for bad input, `checkpoint.CorruptCheckpoint` for a checkpoint that is not what
    was saved, StepDeleted and SavingTooFast as `live.read_checkpoint` does."""
    validate.check_numbers(config)
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    eval_batch_size(config, log=True)
    info = (on_device if on_device.enabled(config.data) else pipeline).info(config.data)
    model = steps.create_model(config, info.num_classes)
    step = None
    if weights:
        try:
            convert.from_torchvision(model, convert.read_weights(weights))
        except (ValueError, OSError) as error:
            raise ValueError(f"--weights: {validate.one_line(error)}") from error
    else:
        manager = live.reader(paths.resolve(workdir))
        step, restored = live.read_checkpoint(manager, which, replicated)
        restored = checkpoint.pure(restored)
        if average:
            if not restored.get("ema"):
                raise ValueError(f"--average: the checkpoint of step {step} holds no moving average "
                                 f"of the weights (its run had train.ema_decay 0)")
            restored = restored["ema"]
        model = steps.with_weights(model, restored)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    pixel_mean.load(config, paths.resolve(workdir) if workdir else None)
    eval_fn = eval_function(nnx.graphdef(model), config, mesh)
    return step, evaluate(eval_fn, jax.device_put(steps.Weights(params, rest), replicated), config, mesh)
