"""Schedules, weight decay, LARS, LAMB and the eval step's exact, masked, 10-crop scoring."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from timm import optim as timm_optim

from configs import (cifar, default, plain18, plain34, preact_cifar, resnet18, resnet34, resnet50,
                     resnet101, resnet152, resnet200)
from resnet_jax import models
from resnet_jax.training import losses, metrics, optim, steps


def test_step_schedule_divides_by_ten_at_epochs_and_scales_with_batch():
    config = default.get_config().schedule
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=100, batch_size=1024, total_steps=12_000)
    assert schedule(0) == pytest.approx(0.4)  # 0.1 x 1024 / 256
    assert schedule(2_999) == pytest.approx(0.4)
    assert schedule(3_000) == pytest.approx(0.04)
    assert schedule(6_000) == pytest.approx(0.004)
    assert schedule(9_000) == pytest.approx(0.0004)


def test_step_schedule_warms_up_linearly_then_divides_at_the_same_epochs():
    # Goyal et al. 2017: batch 8k = 32 x 256, lr from 0.1 to 3.2 over 5 epochs, then the drops.
    # float32 rates; optax's ramp is end + (start - end)(1 - t), a few ulps off at t = 0.
    approx = functools.partial(pytest.approx, rel=1e-5)
    config = default.get_config().schedule
    config.warmup_epochs = 5
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=100, batch_size=8192, total_steps=12_000)
    assert schedule(0) == approx(0.1)
    assert schedule(250) == approx(0.1 + (3.2 - 0.1) / 2)
    assert schedule(499) == approx(0.1 + (3.2 - 0.1) * 499 / 500)
    assert schedule(500) == approx(3.2) and schedule(2_999) == approx(3.2)
    assert schedule(3_000) == approx(0.32)  # epoch 30, counted from step 0
    assert schedule(6_000) == approx(0.032)
    # Where the rate is not above base_lr (unscaled, as LARS takes it; a batch under 256), the
    # ramp starts at 0.
    config.scale_by_batch = False
    unscaled = optim.learning_rate_schedule(config, steps_per_epoch=100, batch_size=8192, total_steps=12_000)
    assert unscaled(0) == 0 and unscaled(250) == approx(0.05) and unscaled(500) == approx(0.1)
    config.scale_by_batch = True
    small = optim.learning_rate_schedule(config, steps_per_epoch=100, batch_size=128, total_steps=12_000)
    assert small(0) == 0 and small(250) == approx(0.025) and small(500) == approx(0.05)


# cifar.py's ResNet-110 warms up until a training error (optim.rate_in_use,
# tests/training/test_warmup_until_error.py), outside the schedule; preact_cifar's for a fixed 400 steps.
@pytest.mark.parametrize("get_config, depth, first", [(cifar.get_config, 56, 0.1),
                                                      (cifar.get_config, 110, 0.1),
                                                      (preact_cifar.get_config, 110, 0.01)])
def test_paper_cifar_schedule(get_config, depth, first):
    config = get_config(f"depth={depth}")
    schedule = optim.learning_rate_schedule(config.schedule, 390, config.train.batch_size, 64_000)
    assert schedule(0) == pytest.approx(first)
    assert schedule(399) == pytest.approx(first)
    assert schedule(400) == pytest.approx(0.1)
    assert schedule(31_999) == pytest.approx(0.1)
    assert schedule(32_000) == pytest.approx(0.01)
    assert schedule(48_000) == pytest.approx(0.001)


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    config = default.get_config().schedule
    config.name, config.warmup_epochs = "cosine", 2
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, batch_size=256, total_steps=100)
    assert schedule(0) == 0 and schedule(10) == pytest.approx(0.05) and schedule(20) == pytest.approx(0.1)
    assert schedule(60) == pytest.approx(0.05, rel=1e-3)
    assert schedule(100) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("end_lr", [0.0, 1e-3])
def test_cosine_schedule_decays_to_its_floor_as_torchs(end_lr):
    config = default.get_config().schedule
    config.update(name="cosine", warmup_epochs=2, end_lr=end_lr)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, batch_size=256, total_steps=100)
    # torch's cosine annealing over the 80 steps after the warm-up, to eta_min.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=80, eta_min=end_lr)
    theirs = []
    for _ in range(81):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        annealing.step()
    np.testing.assert_allclose([schedule(20 + t) for t in range(81)], theirs, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("changes, words", [
    ({"name": "step", "end_lr": 1e-6}, "schedule.end_lr must be 0 with schedule.name='step'"),
    ({"name": "cosine", "end_lr": 0.5}, "schedule.end_lr must be in [0, 0.1]")])
def test_a_bad_floor_is_named(changes, words):
    config = default.get_config().schedule
    config.update(changes)
    with pytest.raises(ValueError) as info:
        optim.learning_rate_schedule(config, 10, 256, 100)
    assert words in str(info.value)


def test_unknown_schedule_is_named():
    config = default.get_config().schedule
    config.name = "linear"
    with pytest.raises(ValueError, match="schedule.name must be one of 'step'.*got 'linear'"):
        optim.learning_rate_schedule(config, 10, 256, 100)


def optimizer_config(**changes):
    config = ml_collections.ConfigDict(dict(
        name="sgd", momentum=0.9, nesterov=False, weight_decay=0.1, weight_decay_mode="l2",
        decay_bn_and_bias=False, lars_trust_coefficient=0.001, lars_eps=0.0,
        lars_adapt_bn_and_bias=False, lamb_betas=(0.9, 0.999), lamb_eps=1e-6, lamb_max_grad_norm=1.0))
    config.update(changes)
    return config


def two_steps(config, lr=0.5):
    params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    grads = {"kernel": jnp.zeros((2, 2)), "scale": jnp.zeros((2,))}
    tx = optim.create_optimizer(config, optax.constant_schedule(lr))
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_weight_decay_l2_passes_through_momentum_and_spares_bn():
    # Zero gradients: w1 = w0 - lr*wd*w0 = 0.95; v = 0.9 * 0.1 + 0.1 * 0.95; w2 = 0.95 - 0.5 * v.
    params = two_steps(optimizer_config())
    np.testing.assert_allclose(params["kernel"], 0.95 - 0.5 * (0.09 + 0.095), rtol=1e-6)
    np.testing.assert_array_equal(params["scale"], 1.0)
    assert float(two_steps(optimizer_config(decay_bn_and_bias=True))["scale"][0]) < 1.0


PAPER_CONFIGS = [m.get_config for m in (resnet18, resnet34, resnet50, resnet101, resnet152,
                                        resnet200, plain18, plain34)] + [
    lambda: cifar.get_config("depth=110"), lambda: cifar.get_config("depth=56,plain=True"),
    lambda: preact_cifar.get_config("depth=164")]


@pytest.mark.parametrize("get_config", PAPER_CONFIGS)
def test_paper_configs_decay_every_parameter(get_config):
    # Sec. 3.4: weight decay 1e-4, on every parameter as Caffe and fb.resnet.torch apply it.
    optimizer = get_config().optimizer
    assert (optimizer.weight_decay, optimizer.decay_bn_and_bias) == (1e-4, True)


@pytest.mark.parametrize("decay_bn_and_bias, decayed", [(True, 62), (False, 21)])
def test_decay_mask_of_resnet18(decay_bn_and_bias, decayed):
    # ResNet-18: 20 conv kernels and the classifier's kernel among 62 parameter arrays; the
    # modern exemption spares the 20 BNs' scales and biases and the classifier's bias.
    model = nnx.eval_shape(lambda: models.create("resnet18", num_classes=1000, rngs=nnx.Rngs(0)))
    mask = optim.decay_mask(nnx.state(model, nnx.Param), decay_bn_and_bias)
    assert sum(jax.tree.leaves(mask)) == decayed and len(jax.tree.leaves(mask)) == 62


def test_default_optimizer_decays_bn_and_biases_of_a_network():
    # Zero gradients from parameters of ones: each parameter, BN's and the classifier bias
    # included, shrinks by lr x weight decay in the first step.
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
    params = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    tx = optim.create_optimizer(default.get_config().optimizer, optax.constant_schedule(0.5))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        np.testing.assert_allclose(update, -0.5 * 1e-4, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_decoupled_weight_decay_skips_momentum():
    params = two_steps(optimizer_config(weight_decay_mode="decoupled"))
    np.testing.assert_allclose(params["kernel"], 0.95 * 0.95, rtol=1e-6)
    with pytest.raises(ValueError, match="weight_decay_mode must be one of 'l2', 'decoupled'"):
        optim.create_optimizer(optimizer_config(weight_decay_mode="adamw"), optax.constant_schedule(0.1))


def one_step(config, lr=0.5):
    """The first update of a conv kernel and a BN's scale and bias from given gradients."""
    params = {"conv": {"kernel": jnp.full((3, 3, 2, 4), 2.0)},
              "bn": {"scale": jnp.ones((4,)), "bias": jnp.full((4,), 0.5)}}
    grads = {"conv": {"kernel": jnp.full((3, 3, 2, 4), 0.3)},
             "bn": {"scale": jnp.full((4,), 0.2), "bias": jnp.full((4,), -0.1)}}
    tx = optim.create_optimizer(config, optax.constant_schedule(lr))
    updates, _ = tx.update(grads, tx.init(params), params)
    return params, grads, updates


def test_lars_scales_kernel_steps_by_the_trust_ratio_and_spares_bn():
    config = optimizer_config(name="lars", weight_decay=1e-4, decay_bn_and_bias=True)
    params, grads, lars = one_step(config)
    _, _, sgd = one_step(optimizer_config(weight_decay=1e-4, decay_bn_and_bias=True))
    w, g = params["conv"]["kernel"], grads["conv"]["kernel"]
    step = g + 1e-4 * w
    ratio = 0.001 * jnp.linalg.norm(w) / jnp.linalg.norm(step)  # about 0.0067
    np.testing.assert_allclose(lars["conv"]["kernel"], -0.5 * ratio * step, rtol=1e-5)
    assert not np.allclose(lars["conv"]["kernel"], sgd["conv"]["kernel"])
    # The mask (MLPerf's): BN's scale and bias take SGD's step, decayed, not adapted.
    for name in ("scale", "bias"):
        np.testing.assert_allclose(lars["bn"][name], sgd["bn"][name], rtol=1e-6)
    _, _, adapted = one_step(optimizer_config(name="lars", lars_adapt_bn_and_bias=True))
    assert not np.allclose(adapted["bn"]["scale"], sgd["bn"]["scale"])


@pytest.mark.parametrize("weight_decay, gradient_scale, max_grad_norm", [
    (0.02, 0.01, 1.0),   # ResNet strikes back A2's decay; gradients under the clipping norm
    (0.01, 10.0, 1.0),   # A1's; clipped
    (0.01, 10.0, 0.0),   # not clipped
    (0.0, 1.0, 1.0)])    # no decay: no array takes the trust ratio
def test_lamb_is_timms(weight_decay, gradient_scale, max_grad_norm):
    rng = np.random.default_rng(0)
    shapes = {"conv": {"kernel": (3, 3, 4, 8)}, "bn": {"scale": (8,), "bias": (8,)},
              "dense": {"kernel": (8, 10), "bias": (10,)}}
    params = jax.tree.map(lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    config = optimizer_config(name="lamb", weight_decay=weight_decay, weight_decay_mode="decoupled",
                              lamb_betas=(0.9, 0.99), lamb_eps=1e-6, lamb_max_grad_norm=max_grad_norm)
    tx = optim.create_optimizer(config, optax.constant_schedule(5e-3))
    state = tx.init(params)
    # timm's parameter groups as its create_optimizer makes them: no decay on 1-D arrays.
    theirs = {path: torch.tensor(np.asarray(leaf), requires_grad=True)
              for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    groups = [{"params": [t for p, t in theirs.items() if t.ndim > 1], "weight_decay": weight_decay},
              {"params": [t for p, t in theirs.items() if t.ndim <= 1], "weight_decay": 0.0}]
    lamb = timm_optim.Lamb(groups, lr=5e-3, betas=(0.9, 0.99), eps=1e-6,
                           max_grad_norm=max_grad_norm or None)
    for _ in range(5):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * gradient_scale, jnp.float32),
                             params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for (path, grad) in jax.tree_util.tree_leaves_with_path(grads):
            theirs[path].grad = torch.tensor(np.asarray(grad))
        lamb.step()
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            np.testing.assert_allclose(leaf, theirs[path].detach().numpy(), rtol=1e-5, atol=1e-7,
                                       err_msg=jax.tree_util.keystr(path))


def test_lamb_takes_decoupled_decay_only():
    with pytest.raises(ValueError, match="^optimizer.weight_decay_mode must be 'decoupled' with "
                                         "optimizer.name='lamb'.*; got 'l2'$"):
        optim.create_optimizer(optimizer_config(name="lamb"), optax.constant_schedule(0.1))


def network_step(optimizer: str):
    """The parameter updates of one train step of CIFAR ResNet-8 from He init."""
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
    graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
    config = default.get_config().optimizer
    config.name = optimizer
    schedule = optax.constant_schedule(0.1)
    tx = optim.create_optimizer(config, schedule)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                             opt_state=tx.init(params), train_metrics=metrics.TrainMetrics.empty(),
                             skipped=jnp.zeros((), jnp.int32))
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 8, 8, 3), np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}
    after, health = jax.jit(functools.partial(steps.train_step, graphdef, tx, schedule, losses.Loss(),
                                              False))(
        state, batch)
    assert bool(health["loss"])
    return {jax.tree_util.keystr(path): np.asarray(new) - np.asarray(old) for (path, new), old
            in zip(jax.tree_util.tree_leaves_with_path(after.params), jax.tree.leaves(params))}


@pytest.mark.slow
def test_lars_in_the_train_step_adapts_kernels_only():
    sgd, lars = network_step("sgd"), network_step("lars")
    kernels = [name for name in sgd if "kernel" in name]
    assert kernels and len(kernels) < len(sgd)
    for name, update in sgd.items():
        if name in kernels:  # trust ratio 0.001 ||w|| / ||g + wd w||: far smaller steps here
            assert np.linalg.norm(lars[name]) < 0.05 * np.linalg.norm(update), name
        else:  # BN and the classifier bias: the first momentum step is SGD's
            np.testing.assert_allclose(lars[name], update, rtol=1e-5, atol=1e-9, err_msg=name)


def test_bad_optimizer_choices_are_named():
    with pytest.raises(ValueError, match="^optimizer.name must be one of 'sgd', 'lars', 'lamb'; got 'adam'$"):
        optim.create_optimizer(optimizer_config(name="adam"), optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="^optimizer.weight_decay_mode must be 'l2' with "
                                         "optimizer.name='lars'.*; got 'decoupled'$"):
        optim.create_optimizer(optimizer_config(name="lars", weight_decay_mode="decoupled"),
                               optax.constant_schedule(0.1))


@pytest.mark.slow
def test_eval_step_counts_unmasked_examples_and_averages_crops():
    model = models.create("cifar_resnet8", num_classes=5, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=stats, opt_state=(),
                             train_metrics=None, skipped=None)
    crops = jax.random.normal(jax.random.key(0), (4, 10, 8, 8, 3))
    labels = jnp.array([0, 1, 2, 3])
    mask = jnp.array([True, True, True, False])
    result = steps.eval_step(graphdef, state, {"image": crops, "label": labels, "mask": mask}).compute()

    probs = np.stack([np.asarray(jax.nn.softmax(model(crops[:, i]))) for i in range(10)]).mean(0)
    expected_loss = -np.log(probs[np.arange(3), labels[:3]]).mean()
    expected_accuracy = (probs[:3].argmax(-1) == np.asarray(labels[:3])).mean()
    top5 = np.argsort(-probs[:3], -1)[:, :5]
    np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)
    assert result["accuracy"] == pytest.approx(expected_accuracy)
    assert result["top5_accuracy"] == pytest.approx((top5 == np.asarray(labels[:3, None])).any(-1).mean())
