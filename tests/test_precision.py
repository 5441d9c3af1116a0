"""bfloat16 compute against float32: one train step of the same network from the same state on the
same batch. On GPUs and TPUs `model.dtype="auto"` runs every step in bfloat16, so this is the check
that such a step still trains as the float32 one does. benchmarks/gpu_check.py runs it on a GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from resnet_jax import metrics, models, optim, train

BATCH = 32


def _one_step(dtype: str, batch: dict[str, np.ndarray]):
    """(loss, parameter update, state after) of one step of CIFAR ResNet-20 from He init."""
    model = models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    schedule = optax.constant_schedule(0.1)
    tx = optim.create_optimizer(default.get_config().optimizer, schedule)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                             opt_state=tx.init(params), train_metrics=metrics.TrainMetrics.empty(),
                             skipped=jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(train.train_step, graphdef, tx, schedule, 0.0, False))
    before = jax.device_get(params)
    after, health = step(state, batch)
    assert bool(health["loss"]) and int(health["gradients"]) == -1, f"{dtype}: non-finite step"
    update = jax.tree.map(lambda new, old: np.asarray(new, np.float64) - np.asarray(old, np.float64),
                          jax.device_get(after.params), before)
    flat = np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(update)])
    return float(after.train_metrics.compute()["loss"]), flat, after


@pytest.fixture(scope="module")
def steps():
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((BATCH, 32, 32, 3), np.float32),
             "label": rng.integers(0, 10, BATCH).astype(np.int32)}
    return {dtype: _one_step(dtype, batch) for dtype in ("bfloat16", "float32")}


def test_bfloat16_step_is_close_to_the_float32_step(steps):
    (low_loss, low, _), (high_loss, high, _) = steps["bfloat16"], steps["float32"]
    assert np.isfinite(low).all() and np.isfinite(high).all()
    # Measured on the CPU (2026-12-02): losses 3.5014 and 3.5009; the updates' cosine 0.995, their
    # difference 10% of the float32 update's norm (bfloat16's 8-bit mantissa, through 20 layers).
    assert abs(low_loss - high_loss) < 0.02, (low_loss, high_loss)
    cosine = low @ high / (np.linalg.norm(low) * np.linalg.norm(high))
    assert cosine > 0.98, cosine
    assert np.linalg.norm(low - high) < 0.2 * np.linalg.norm(high)


def test_bfloat16_step_keeps_float32_state(steps):
    # Only the compute is bfloat16: parameters, optimizer state, BN statistics and the loss window
    # stay float32, so that small updates are not rounded away.
    *_, state = steps["bfloat16"]
    floats = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state,
                                                      state.batch_stats, state.train_metrics))
              if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert floats == {jnp.dtype("float32")}
