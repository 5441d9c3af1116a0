"""He et al. 2015, Sec. 4.2: ResNet-110 warms up at lr 0.01 "until the training error is below
80% (about 400 iterations), and then go[es] back to 0.1" (schedule.warmup_until_error).

The training error is forced: TrainMetrics.compute, which the loop calls once per log window,
reports the accuracy the test sets; the learning rates are those the steps used, as written to
metrics.jsonl."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import cifar, default, preact_cifar
from resnet_jax import models
from resnet_jax.run import checkpoint, jsonl, validate
from resnet_jax.training import loop, losses, metrics, optim, steps
from runs import assert_trees_close, latest_params, small_config

WARMUP_LR, BASE_LR = 0.01, 0.1
WARM = {"schedule.name": "paper_cifar", "schedule.base_lr": BASE_LR,
        "schedule.warmup_lr": WARMUP_LR, "schedule.warmup_until_error": 0.8,
        "schedule.boundaries_steps": (1_000,), "train.num_steps": 8, "eval.every_steps": 8,
        "checkpoint.every_steps": 100}
# One log window per step (SMALL's log_every_steps=1): the error of window k is ERRORS[k - 1].
# The first below 0.8 is step 6's; the error of step 8 is above it again, which must not matter.
ERRORS = [0.9, 0.95, 0.85, 0.9, 0.81, 0.5, 0.9, 0.99]
SWITCH = 6
REAL_COMPUTE = metrics.TrainMetrics.compute  # not a forced one a previous run left in place


def forced(monkeypatch, errors):
    """Each log window's training error taken from `errors` in turn."""
    left = list(errors)

    def compute(self):
        return {**REAL_COMPUTE(self), "accuracy": 1.0 - left.pop(0)}

    monkeypatch.setattr(metrics.TrainMetrics, "compute", compute)


def run(monkeypatch, workdir, errors, num_steps):
    forced(monkeypatch, errors)
    loop.train_and_evaluate(small_config(**{**WARM, "train.num_steps": num_steps}), str(workdir),
                            allow_config_change=True)


def rates(workdir):
    return {row["step"]: row["learning_rate"] for row in jsonl.read_rows(str(workdir))
            if "learning_rate" in row}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run(monkeypatch, workdir, ERRORS, 8)
    return workdir


@pytest.mark.slow
def test_the_rate_stays_at_warmup_lr_until_the_first_window_below_the_error(whole):
    expected = {step: WARMUP_LR if step <= SWITCH else BASE_LR for step in range(1, 9)}
    assert rates(whole) == pytest.approx(expected)
    step, state = checkpoint.read_latest(str(whole))
    assert step == 8 and bool(state["warmed_up"])


def test_the_switch_is_logged_once(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    run(monkeypatch, tmp_path, ERRORS, 8)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Warm-up over")]
    assert said == ["Warm-up over at step 6: training error 0.5000 below "
                    "schedule.warmup_until_error=0.8; learning rate now 0.1"]


def test_without_a_window_below_the_error_the_warmup_never_ends(tmp_path, monkeypatch):
    run(monkeypatch, tmp_path, [0.8] * 4, 4)  # not below 0.8
    assert rates(tmp_path) == pytest.approx({step: WARMUP_LR for step in range(1, 5)})
    assert not bool(checkpoint.read_latest(str(tmp_path))[1]["warmed_up"])


@pytest.mark.slow
def test_runs_resumed_before_and_after_the_switch_keep_its_rate(tmp_path, monkeypatch, whole):
    # Stopped at step 4, before the switch: resumed at warmup_lr, and switched at step 6 as an
    # uninterrupted run. Stopped at 7, after it: resumed at base_lr although step 8's error is
    # above the threshold (the switch is in the checkpoint, not made again).
    run(monkeypatch, tmp_path, ERRORS[:4], 4)
    assert not bool(checkpoint.read_latest(str(tmp_path))[1]["warmed_up"])
    run(monkeypatch, tmp_path, ERRORS[4:7], 7)
    assert bool(checkpoint.read_latest(str(tmp_path))[1]["warmed_up"])
    run(monkeypatch, tmp_path, ERRORS[7:], 8)
    assert rates(tmp_path) == rates(whole)
    assert_trees_close(latest_params(tmp_path)[1], latest_params(whole)[1], rtol=0, atol=0)


def test_rate_in_use_is_warmup_lr_until_warmed_up_then_the_schedule_from_step_0():
    config = cifar.get_config("depth=110")
    schedule = optim.learning_rate_schedule(config.schedule, 390, config.train.batch_size, 64_000)
    rate = jax.jit(functools.partial(optim.rate_in_use, schedule, warmup_lr=0.01))
    for step in (0, 400, 32_000, 50_000):  # however long the warm-up lasts
        assert rate(step, False) == pytest.approx(0.01)
    assert [float(rate(step, True)) for step in (0, 31_999, 32_000, 48_000)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.001])


@pytest.mark.slow
def test_the_train_step_takes_warmup_lr_then_the_schedules_rate_through_momentum():
    # Two steps, the first warming up and the second not, against SGD whose schedule is 0.01 then
    # 0.1: the rate is applied after momentum (Caffe), so the momentum buffer carries gradients,
    # not steps, over the switch. The metrics report the rates used.
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
    graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
    config = default.get_config().optimizer
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 8, 8, 3), np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}

    def two_steps(schedule, warmup_lr, flags):
        tx = optim.create_optimizer(config, schedule)
        state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 model_state=model_state, opt_state=tx.init(params),
                                 train_metrics=metrics.TrainMetrics.empty(),
                                 skipped=jnp.zeros((), jnp.int32))
        step = jax.jit(functools.partial(steps.train_step, graphdef, tx, schedule, losses.Loss(), False,
                                         warmup_lr=warmup_lr))
        used = []
        for flag in flags:
            state, _ = step(state.replace(warmed_up=jnp.asarray(flag),
                                          train_metrics=metrics.TrainMetrics.empty()), batch)
            used.append(float(state.train_metrics.compute()["learning_rate"]))
        return state.params, used

    warming, warming_rates = two_steps(optax.constant_schedule(BASE_LR), WARMUP_LR, [False, True])
    plain, plain_rates = two_steps(lambda step: jnp.where(step < 1, WARMUP_LR, BASE_LR), None,
                                   [True, True])
    assert warming_rates == plain_rates == pytest.approx([WARMUP_LR, BASE_LR])
    for a, b in zip(jax.tree.leaves(warming), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    always, _ = two_steps(optax.constant_schedule(BASE_LR), WARMUP_LR, [True, True])
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(always), jax.tree.leaves(warming)))


def test_the_cifar_recipe_warms_up_until_an_error_from_depth_110():
    for depth, until in [(56, 0.0), (110, 0.8), (1202, 0.8)]:
        s = cifar.get_config(f"depth={depth}").schedule
        assert (s.warmup_until_error, s.warmup_steps, s.warmup_lr) == (until, 0, 0.01)
        validate.check_numbers(cifar.get_config(f"depth={depth}"))
    validate.check_numbers(preact_cifar.get_config("depth=110"))  # a fixed 400 steps


@pytest.mark.parametrize("changes, message", [
    ({"warmup_until_error": 1.5}, "schedule.warmup_until_error must be in [0, 1]: the training "
                                  "error below which the warm-up ends (Sec. 4.2: 0.8), or 0 for "
                                  "none; got 1.5"),
    ({"warmup_until_error": -0.1}, "schedule.warmup_until_error must be in [0, 1]"),
    ({"warmup_until_error": float("nan")}, "schedule.warmup_until_error must be in [0, 1]"),
    ({"warmup_until_error": float("inf")}, "schedule.warmup_until_error must be in [0, 1]"),
    ({"warmup_steps": 400}, "schedule.warmup_steps must be 0 with schedule.warmup_until_error=0.8 "
                            "(set one of the two to 0); got 400"),
    ({"name": "step"}, "schedule.name must be 'paper_cifar' with schedule.warmup_until_error=0.8 "
                       "(Sec. 4.2's warm-up); got 'step'"),
    ({"warmup_lr": 0.0}, "schedule.warmup_lr must be a positive number; got 0.0"),
])
def test_bad_warmups_are_refused_in_one_line(changes, message):
    config = cifar.get_config("depth=110")
    config.schedule.update(changes)
    with pytest.raises(validate.SetupError) as error:
        validate.check_numbers(config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_lars_is_refused_with_the_warmup_until_an_error():
    config = cifar.get_config("depth=110")
    config.optimizer.name = "lars"
    with pytest.raises(validate.SetupError, match=r"^optimizer.name must be 'sgd' with "
                       r"schedule.warmup_until_error=0.8; got 'lars'$"):
        validate.check_numbers(config)
