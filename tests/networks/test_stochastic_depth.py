"""Stochastic depth (models.py, `drop_path_rate`): its linear rule over the blocks, each
example's branch dropped or kept scaled, its expectation, and its random stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import models


def _rates(model):
    return [0.0 if info.block.drop_path is None else info.block.drop_path.rate
            for info in models.blocks(model)]


def test_the_rate_rises_linearly_from_the_first_block_to_the_last():
    model = models.create("resnet50", num_classes=10, rngs=nnx.Rngs(0), drop_path_rate=0.05)
    np.testing.assert_allclose(_rates(model), [0.05 * k / 15 for k in range(16)], rtol=1e-12)
    assert _rates(models.create("resnet50", num_classes=10, rngs=nnx.Rngs(0))) == [0.0] * 16


def test_the_rate_changes_no_initial_weight():
    plain, dropping = (nnx.state(models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(3),
                                               drop_path_rate=rate), nnx.Param) for rate in (0.0, 0.2))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), plain, dropping))


def _block(rate):
    """A block without a ReLU after the addition, so that its output is F(x) + shortcut(x)."""
    layers = models.make_layers(bn_momentum=0.9, bn_epsilon=1e-5, bn_group_size=None,
                                dtype=jnp.float32, param_dtype=jnp.float32, init_fan="fan_in",
                                conv_weight_grad="xla")
    return models.BasicBlock(8, 8, 1, shortcut="B", residual=True, zero_init_residual=False,
                             stride_on="1x1", layers=layers, rngs=nnx.Rngs(0), order="no_final_relu",
                             drop_path=rate, drop_path_rngs=nnx.Rngs(drop_path=1))


def test_each_example_keeps_its_branch_scaled_or_drops_it_and_the_mean_is_the_branch():
    rate, draws = 0.3, 400
    block = _block(rate)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6, 6, 8)), jnp.float32)
    branch, shortcut = np.asarray(block.branch(x)), np.asarray(block.shortcut(x))
    outputs = np.stack([np.asarray(block(x)) for _ in range(draws)])
    kept = np.isclose(outputs, shortcut + branch / (1 - rate), rtol=1e-5, atol=1e-5).all(axis=(2, 3, 4))
    dropped = np.isclose(outputs, shortcut, rtol=1e-6, atol=1e-6).all(axis=(2, 3, 4))
    assert (kept ^ dropped).all()  # one or the other, each example whole
    assert abs(dropped.mean() - rate) < 0.03  # 3200 draws: about 4 standard deviations
    # Drawn anew each call and for each example: one mask for the batch would give 2 patterns.
    assert len({tuple(row) for row in dropped}) > 50
    np.testing.assert_allclose(outputs.mean(0), shortcut + branch, atol=0.15 * np.abs(branch).max())
    block.eval()
    np.testing.assert_allclose(block(x), shortcut + block.branch(x), rtol=1e-6, atol=1e-6)


def test_a_jitted_step_draws_from_the_state_it_is_given():
    # As the train step runs it: the stream's count leaves with the non-parameter state, so a
    # step given the same state draws the same, and the next step's state draws anew.
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), drop_path_rate=0.5)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 3)), jnp.float32)

    @jax.jit
    def forward(params, rest, x):
        copy = nnx.merge(graphdef, params, rest, copy=True)
        return copy(x), nnx.state(copy, nnx.Not(nnx.Param))

    first, after = forward(params, rest, x)
    again, _ = forward(params, rest, x)
    second, _ = forward(params, after, x)
    assert np.array_equal(first, again) and np.abs(first - second).max() > 0.1

    def counts(state):
        return [int(count) for path, count in jax.tree_util.tree_leaves_with_path(state)
                if "drop_path" in jax.tree_util.keystr(path) and "count" in jax.tree_util.keystr(path)]
    assert counts(rest) == [0, 0] and counts(after) == [1, 1]  # the blocks of rate 0.25 and 0.5


@pytest.mark.parametrize("options, words", [
    ({"drop_path_rate": 1.0}, "drop_path_rate must be in [0, 1); got 1.0"),
    ({"drop_path_rate": 0.1, "scan_blocks": True}, "a scanned stage runs its blocks as one"),
])
def test_bad_rates_are_named(options, words):
    with pytest.raises(ValueError) as info:
        models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(0), **options)
    assert words in str(info.value)


def test_a_plain_network_has_no_branch_to_drop():
    with pytest.raises(ValueError, match="a plain network has none"):
        models.create("cifar_plain20", num_classes=10, rngs=nnx.Rngs(0), drop_path_rate=0.1)
