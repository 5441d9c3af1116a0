"""The train state and the jitted steps: one SGD step, the eval steps (one crop, 10 crops,
multi-scale), and the state as training, evaluation and checkpoints each take it.

The model is split once into a graph definition and its state; the steps are pure functions of
(state, batch) under `jax.jit`, with the batch sharded over the mesh, the state replicated and
donated (docs/design.md)."""

import dataclasses
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from resnet_jax import models
from resnet_jax.data import device_inputs
from resnet_jax.distributed import sharding
from resnet_jax.run import checkpoint
from resnet_jax.training import losses, metrics, optim, running_stats
from resnet_jax.training import ema as ema_lib, mixing as mixing_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    # Every variable that is not a parameter: BN's running statistics, and in networks with
    # dropout (VGG) its random stream. Checkpoints written before this name call it "batch_stats".
    model_state: nnx.State
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
    # The moving average of the weights (`ema.Average`) where train.ema_decay asks for one.
    ema: Any = None


_FORMER_NAMES = {"batch_stats": "model_state"}


def current_names(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's fields (`checkpoint.pure`'s dicts, or a restored state's) by TrainState's
    names, those of checkpoints written before a field was renamed included."""
    return {_FORMER_NAMES.get(name, name): value for name, value in saved.items()}


def with_weights(model: nnx.Module, state: dict[str, Any]) -> nnx.Module:
    """`model` holding a checkpoint's weights (`checkpoint.pure`'s dicts)."""
    state = current_names(state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, state["params"])
    nnx.replace_by_pure_dict(rest, state["model_state"])
    return nnx.merge(graphdef, params, rest)


class Weights(NamedTuple):
    """What an eval step takes of a TrainState: a network's weights alone."""
    params: Any
    model_state: Any


def model_options(config: Any) -> dict[str, Any]:
    """The `model` section less the name: the overrides `models.create` takes."""
    return {k: v for k, v in config.model.items() if k not in ("name", "init_from")}


# What train_step reports of each step besides the new state.
HEALTH = ("loss", "gradients", "labels")


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
               loss: losses.Loss, skip_nonfinite: bool, state: TrainState,
               batch: dict[str, jax.Array], *, warmup_lr: float | None = None,
               mixing: mixing_lib.Mixing | None = None, ema: ema_lib.EMA | None = None):
    """One step of `loss` (per example, averaged), on the batch mixed by `mixing` (mixup,
    CutMix) where given, `state.ema` moved by `ema` where given. Also returns its health: is the
    loss finite, is each gradient, are the labels in range. With `skip_nonfinite` a step whose
    loss or gradients are not finite changes nothing (the average neither) but the step counter.
    `warmup_lr`: the rate until `state.warmed_up`, the warm-up of schedule.warmup_until_error
    (Sec. 4.2; `optim.rate_in_use`); None where there is none."""
    def loss_fn(params, model_state):
        # A fresh copy inside the differentiated function, so that BN may update its statistics.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        logits = model(images)
        targets = loss.targets(batch["label"], logits.shape[-1])
        if lam is not None:
            targets = mixing_lib.targets(targets, lam)
        per_example = loss.of_targets(logits, targets)
        return per_example.mean(), (per_example, logits, nnx.state(model, nnx.Not(nnx.Param)))

    images, lam = (batch["image"], None) if mixing is None else mixing(batch["image"], state.step)
    (mean, (per_example, logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state)
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
                              model_state=model_state, opt_state=opt_state)
    if ema is not None:
        new_state = new_state.replace(ema=ema.update(state.ema, new_state.params, model_state,
                                                     state.step + 1))
    # The first non-finite gradient element over all leaves, in one reduction (-1 if none); the
    # host names the leaf. The leaves are joined first and checked once: checked one by one, each
    # leaf's check was a loop fusion that XLA's CPU backend compiled into a kernel of its own
    # (benchmarks/README.md counts them).
    bad = lax.bitwise_not(lax.is_finite(jnp.concatenate(
        [g.reshape(g.size) for g in jax.tree.leaves(grads)])))
    first_bad = jnp.argmax(bad)
    health = {"loss": jnp.isfinite(mean),
              "gradients": jnp.where(bad[first_bad], first_bad, -1),
              "labels": ((batch["label"] >= 0) & (batch["label"] < logits.shape[-1])).all()}
    finite = health["loss"] & (health["gradients"] < 0)
    if skip_nonfinite:
        # (optax's schedule count goes back too: a skipped step holds the schedule back by one.)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    # A skipped step counts in no average.
    step_metrics = metrics.TrainMetrics.single_from_model_output(
        loss=per_example, accuracy=jnp.argmax(logits, -1) == batch["label"],
        learning_rate=jnp.full(per_example.shape, rate),
        mask=jnp.broadcast_to(finite, per_example.shape))
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
    model = nnx.merge(graphdef, state.params, state.model_state)
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
    is averaged over its 2 x scales views. `variables` is (params, model_state).

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
    return state.replace(model_state=running_stats.resume(state.model_state, saved, mesh),
                         device_stats=None)


def for_evaluation(state: TrainState, mesh, bn_group_size: int | None) -> TrainState:
    """The state as evaluation takes it: `for_training` undone, the per-device running
    statistics averaged."""
    if bn_group_size is None:
        return state
    return state.replace(model_state=running_stats.gather(state.model_state, mesh))


def for_checkpoint(settled: TrainState, state: TrainState, bn_group_size: int | None) -> TrainState:
    """What a checkpoint holds: the state as evaluation takes it (`settled`), and with ghost BN
    also the per-device statistics of the training `state`, for `for_training` to take back."""
    if bn_group_size is None:
        return settled
    return settled.replace(device_stats=running_stats.per_device(state.model_state))


def restore_target(state: TrainState, mesh) -> Callable[[dict], dict]:
    """What `checkpoint.restore_latest` restores a step onto, from the step's metadata: `state`'s
    fields as a dict, with `device_stats` in the shapes the checkpoint holds (saved on any device
    count, replicated: they are small), or without it where the checkpoint predates the field;
    `ema` where the checkpoint holds one (in its own shapes where `state` keeps none, for the
    loop to drop), else without it (the loop starts one from the weights)."""
    def target(saved: dict) -> dict:
        fields = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
        del fields["device_stats"], fields["ema"]
        for former, name in _FORMER_NAMES.items():
            if former in saved:  # restored under the checkpoint's name (`current_names`)
                fields[former] = fields.pop(name)

        def as_saved(tree):
            return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=sharding.replicated(mesh)), tree)

        if "device_stats" in saved:
            fields["device_stats"] = as_saved(saved["device_stats"])
        if "ema" in saved:  # as `state` keeps it, or as saved where it keeps none (`with_ema`)
            fields["ema"] = as_saved(saved["ema"]) if state.ema is None else state.ema
        return fields
    return target
