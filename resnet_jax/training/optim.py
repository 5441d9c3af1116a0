"""The optimizer and learning-rate schedules.

The paper (Sec. 3.4): SGD, momentum 0.9, weight decay 1e-4, batch 256, learning rate 0.1
divided by 10 when the error plateaus. CIFAR (Sec. 4.2): batch 128, 0.1 divided by 10 at 32k and
48k iterations, stopped at 64k; ResNet-110 warms up at 0.01 "until the training error is below 80%
(about 400 iterations)" (`rate_in_use`; or for a fixed number of steps). For large
batches: the linear scaling rule and a gradual warm-up (Goyal et al. 2017), LARS (You et al.
2017), and cosine decay. From later recipes: LAMB (You et al. 2020), Nesterov momentum, decoupled
weight decay, BN and biases spared weight decay, cosine decay to a floor.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("step", "paper_cifar", "cosine", "constant")
WEIGHT_DECAY_MODES = ("l2", "decoupled")
OPTIMIZERS = ("sgd", "lars", "lamb")


def learning_rate_schedule(config: Any, steps_per_epoch: int, batch_size: int,
                           total_steps: int) -> optax.Schedule:
    """config: the `schedule` section. The rate is base_lr x batch / 256 where `scale_by_batch`.

    step: divided by 10 at each epoch of `boundaries_epochs`; with `warmup_epochs` > 0, the
    gradual warm-up of Goyal et al. 2017 (Sec. 2.2) first: from base_lr, the rate of batch 256,
    up by the same amount each step to the scaled rate, reached at the warm-up's end (from 0
    where the rate is not above base_lr; none in the paper). paper_cifar: divided by 10 at each
    step of `boundaries_steps`, with `warmup_lr` for the first `warmup_steps` (a fixed-length
    ResNet-110 warm-up; 0 steps for none); with `warmup_until_error` instead, the schedule is the
    rate after the warm-up and `rate_in_use` the rate of each step. cosine: linear warm-up over
    `warmup_epochs` from 0, then cosine decay to `end_lr` (0, or timm's recipes' floor) at the
    run's last step. constant: base_lr throughout.
    """
    if config.name not in SCHEDULES:
        raise ValueError(f"schedule.name must be one of {', '.join(map(repr, SCHEDULES))}; got {config.name!r}")
    if config.end_lr and config.name != "cosine":
        raise ValueError(f"schedule.end_lr must be 0 with schedule.name={config.name!r} (it is "
                         f"cosine's floor); got {config.end_lr!r}")
    peak = config.base_lr * (batch_size / 256 if config.scale_by_batch else 1.0)
    if config.name == "constant":
        return optax.constant_schedule(peak)
    if config.name == "step":
        drops = optax.piecewise_constant_schedule(
            peak, {int(e * steps_per_epoch): 0.1 for e in config.boundaries_epochs})
        warmup = int(config.warmup_epochs * steps_per_epoch)
        if not warmup:
            return drops
        # Goyal et al. start at the rate of batch 256; where the peak is no higher (unscaled rates,
        # as LARS takes them; batches up to 256) the ramp starts at 0, as cosine's does.
        start = config.base_lr if peak > config.base_lr else 0.0
        ramp = optax.linear_schedule(start, peak, warmup)
        # As paper_cifar's: the boundaries count from step 0, not from the warm-up's end.
        return lambda step: jnp.where(step < warmup, ramp(step), drops(step))
    if config.name == "paper_cifar":
        drops = optax.piecewise_constant_schedule(peak, {int(s): 0.1 for s in config.boundaries_steps})
        if not config.warmup_steps:
            return drops
        # Not optax.join_schedules: it would shift the drops by the warm-up's length.
        return lambda step: jnp.where(step < config.warmup_steps, config.warmup_lr, drops(step))
    if not 0 <= config.end_lr <= peak:
        raise ValueError(f"schedule.end_lr must be in [0, {peak:g}] (0 to the peak rate); got "
                         f"{config.end_lr!r}")
    warmup = int(config.warmup_epochs * steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                              end_value=config.end_lr)


def rate_in_use(schedule: optax.Schedule, step: jax.Array, warmed_up: jax.Array,
                warmup_lr: float) -> jax.Array:
    """The rate of `step` under He et al. 2015's warm-up of Sec. 4.2 ("we use 0.01 to warm up the
    training until the training error is below 80% (about 400 iterations), and then go back to
    0.1"), `schedule.warmup_until_error`: `warmup_lr` until `warmed_up` (TrainState's switch, set
    by the loop at the first log window whose training error is below the threshold), then the
    schedule's rate, paper_cifar's drops counted from step 0 as with `warmup_steps`."""
    return jnp.where(warmed_up, schedule(step), warmup_lr)


def decay_mask(params: Any, decay_bn_and_bias: bool) -> Any:
    """True where weight decay applies: every parameter (the paper, Sec. 3.4), or with
    decay_bn_and_bias=False conv and dense kernels only (the modern exemption of BN scales and
    biases and of biases).

    Told by name, not by rank: stacked (scanned) BN parameters have two axes.
    """
    def is_kernel(path, _):
        return decay_bn_and_bias or any(getattr(k, "key", getattr(k, "name", None)) == "kernel"
                                        for k in path)
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """config: the `optimizer` section (name, momentum, nesterov, weight_decay, weight_decay_mode,
    decay_bn_and_bias, lars_trust_coefficient, lars_eps, lars_adapt_bn_and_bias, lamb_betas,
    lamb_eps, lamb_max_grad_norm).

    "sgd" (the paper, Sec. 3.4): momentum SGD. weight_decay_mode "l2" (the paper): weight_decay x
    w is added to the gradient, so it passes through momentum. "decoupled" (Loshchilov and
    Hutter 2019): it is added after momentum, scaled by the rate.

    "lars" (You et al. 2017, "Large Batch Training of Convolutional Networks"; `optax.lars`), for
    batches of 8k and more, as MLPerf's ResNet-50 uses it: each parameter array's step, its
    gradient plus weight_decay x w, is scaled by lars_trust_coefficient x ||w|| / (||step|| +
    lars_eps) and by the rate, then goes through momentum. The arrays the trust ratio leaves out
    (BN's scales and biases and the biases, unless lars_adapt_bn_and_bias) take plain momentum
    steps at the global rate, as MLPerf's reference does. The ratio is one per array, so a
    scanned stage (its blocks stacked in one array) cannot take it; `validate` refuses that.

    "lamb" (You et al. 2020, "Large Batch Optimization for Deep Learning"), as ResNet strikes back
    trained with it (timm's `Lamb`): the gradients clipped to a global norm of lamb_max_grad_norm
    (0: not clipped), Adam's bias-corrected step (lamb_betas, lamb_eps), plus weight_decay x w,
    scaled by ||w|| / ||step|| (1 where either is 0) and by the rate. The arrays weight decay
    spares (decay_bn_and_bias=False) take neither the decay nor the ratio, and with
    weight_decay 0 none takes the ratio, as in timm. Its decay is decoupled from the moments:
    weight_decay_mode must be "decoupled". The ratio is per array, as LARS's.
    """
    if config.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {', '.join(map(repr, OPTIMIZERS))}; "
                         f"got {config.name!r}")
    if config.weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"optimizer.weight_decay_mode must be one of "
                         f"{', '.join(map(repr, WEIGHT_DECAY_MODES))}; got {config.weight_decay_mode!r}")
    def decayed(params):
        return decay_mask(params, config.decay_bn_and_bias)

    if config.name == "lars":
        if config.weight_decay_mode != "l2":
            raise ValueError(f"optimizer.weight_decay_mode must be 'l2' with optimizer.name='lars' "
                             f"(its trust ratio measures the decayed step); got "
                             f"{config.weight_decay_mode!r}")
        # The same split as weight decay's: kernels, and BN and biases only if asked.
        return optax.lars(
            schedule, weight_decay=config.weight_decay, weight_decay_mask=decayed,
            trust_coefficient=config.lars_trust_coefficient, eps=config.lars_eps,
            trust_ratio_mask=lambda p: decay_mask(p, config.lars_adapt_bn_and_bias),
            momentum=config.momentum, nesterov=config.nesterov)
    if config.name == "lamb":
        if config.weight_decay_mode != "decoupled":
            raise ValueError(f"optimizer.weight_decay_mode must be 'decoupled' with optimizer.name="
                             f"'lamb' (LAMB adds the decay after Adam's moments); got "
                             f"{config.weight_decay_mode!r}")

        def adapted(params):  # the arrays that take the trust ratio: those decayed
            return jax.tree.map(lambda d: d and config.weight_decay > 0, decayed(params))

        b1, b2 = config.lamb_betas
        clip = [optax.clip_by_global_norm(config.lamb_max_grad_norm)] if config.lamb_max_grad_norm else []
        return optax.chain(*clip, optax.scale_by_adam(b1, b2, config.lamb_eps),
                           optax.add_decayed_weights(config.weight_decay, decayed),
                           optax.masked(optax.scale_by_trust_ratio(), adapted),
                           optax.scale_by_learning_rate(schedule))
    decay = optax.add_decayed_weights(config.weight_decay, decayed)
    momentum = optax.trace(decay=config.momentum, nesterov=config.nesterov)
    steps = [decay, momentum] if config.weight_decay_mode == "l2" else [momentum, decay]
    return optax.chain(*steps, optax.scale_by_learning_rate(schedule))
