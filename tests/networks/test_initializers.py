"""The initial weights: Sec. 3.4's He initialisation (and Flax's truncated default for the
classifier) by their variance, the same weights whether a network is created eagerly or traced,
and no XLA compilation per weight shape."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from resnet_jax import initializers, models


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_he_normal_has_variance_two_over_fan(mode):
    shape = (3, 3, 64, 128)  # kh, kw, in, out
    w = np.asarray(initializers.he_normal(mode)(jax.random.key(0), shape))
    fan = 9 * (64 if mode == "fan_in" else 128)
    assert w.shape == shape and w.dtype == np.float32
    assert abs(w.mean()) < 0.01 * math.sqrt(2 / fan)
    assert w.std() == pytest.approx(math.sqrt(2 / fan), rel=0.01)
    assert np.abs(w).max() > 3 * math.sqrt(2 / fan)  # a normal's tails, not a truncated one's


def test_lecun_normal_is_truncated_at_two_deviations_with_variance_one_over_fan_in():
    w = np.asarray(initializers.lecun_normal()(jax.random.key(1), (512, 1000)))
    # The standard normal cut at +-2 has standard deviation 0.8796; scaled back to 1 / fan_in.
    assert np.abs(w).max() <= 2 * math.sqrt(1 / 512) / 0.87962566 * (1 + 1e-6)
    assert w.std() == pytest.approx(math.sqrt(1 / 512), rel=0.01)


def test_weights_differ_by_key_and_keep_the_dtype():
    init = initializers.normal(0.01)
    a, b = (np.asarray(init(jax.random.key(k), (40000,), jax.numpy.bfloat16)) for k in (0, 1))
    assert a.dtype == jax.numpy.bfloat16 and not np.array_equal(a, b)
    assert a.astype(np.float32).std() == pytest.approx(0.01, rel=0.02)


def test_a_network_has_the_same_weights_created_eagerly_or_traced():
    def create():
        return nnx.state(models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(3)))

    eager, traced = create(), jax.jit(create)()
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_creating_a_network_compiles_nothing_per_weight_shape(xla_compiles):
    models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))  # what is compiled once
    xla_compiles.clear()  # shapes no test creates: each would be a compilation before
    models.create("resnet18", num_classes=7, width=24, rngs=nnx.Rngs(5))
    models.create("vgg16_bn", num_classes=9, width=4, rngs=nnx.Rngs(6))
    assert xla_compiles == []
