"""The matrix-product kernel gradient (resnet_jax/cpu.py) against XLA's own convolution gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import cpu, models

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("size, kernel, stride, padding, channels", [
    (9, 3, 1, ((1, 1), (1, 1)), (5, 7)),
    (9, 3, 2, ((1, 1), (1, 1)), (4, 6)),      # odd map, stride 2: the last row is not a start
    (11, 7, 2, ((3, 3), (3, 3)), (3, 8)),     # the ImageNet stem
    (8, 1, 2, ((0, 0), (0, 0)), (6, 12)),     # a projection shortcut
    (10, 3, 1, ((0, 2), (1, 0)), (2, 3)),     # asymmetric padding ("SAME" at stride 2 pads so)
    (6, 5, 3, ((2, 2), (2, 2)), (3, 4)),
])
def test_gradients_equal_xla(size, kernel, stride, padding, channels):
    cin, cout = channels
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, size, size + 1, cin))
    w = jax.random.normal(kw, (kernel, kernel, cin, cout))

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DIMENSIONS)

    def ours(x, w):
        return cpu.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DIMENSIONS)

    @jax.jit
    def outputs_and_gradients(x, w):
        y, xla_vjp = jax.vjp(xla, x, w)
        g = jax.random.normal(kg, y.shape)
        y_ours, ours_vjp = jax.vjp(ours, x, w)
        return y, y_ours, xla_vjp(g), ours_vjp(g)

    y, y_ours, xla_grads, our_grads = outputs_and_gradients(x, w)
    np.testing.assert_array_equal(y_ours, y)
    for expected, got in zip(xla_grads, our_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_kernel_gradient_is_accumulated_in_float32():
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (3, 3, 16, 16)).astype(jnp.bfloat16)
    padding = ((1, 1), (1, 1))
    g = jnp.ones((4, 8, 8, 16), jnp.bfloat16)
    _, vjp = jax.vjp(lambda w: cpu.conv_general_dilated(x, w, (1, 1), padding), w)
    (got,) = vjp(g)
    _, exact_vjp = jax.vjp(lambda w: jax.lax.conv_general_dilated(
        x.astype(jnp.float32), w, (1, 1), padding, dimension_numbers=DIMENSIONS), w.astype(jnp.float32))
    (exact,) = exact_vjp(g.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), exact, rtol=1e-2, atol=1e-1)


def test_unsupported_convolutions_are_refused():
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2))
    with pytest.raises(ValueError, match="feature groups"):
        cpu.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), feature_group_count=2)


@pytest.mark.slow
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_model_gradients_and_outputs_do_not_depend_on_the_option(shortcut):
    x = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
    results = []
    for option in ("xla", "matmul"):
        model = models.create("cifar_resnet8", num_classes=5, rngs=nnx.Rngs(0), shortcut=shortcut,
                              conv_weight_grad=option)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            out = nnx.merge(graphdef, params, rest, copy=True)(x)
            return jnp.sum(out * jnp.arange(5.0)), out

        results.append(jax.jit(jax.grad(loss, has_aux=True))(params))
    (grads_xla, out_xla), (grads_ours, out_ours) = results
    np.testing.assert_allclose(out_ours, out_xla, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_xla), jax.tree.leaves(grads_ours)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_auto_picks_matmul_on_cpu_only_and_unknown_values_are_refused():
    model = models.create("cifar_resnet8", num_classes=2, rngs=nnx.Rngs(0))
    on_cpu = jax.default_backend() == "cpu"
    assert (model.conv1.conv_general_dilated is cpu.conv_general_dilated) == on_cpu
    xla = models.create("cifar_resnet8", num_classes=2, rngs=nnx.Rngs(0), conv_weight_grad="xla")
    assert xla.conv1.conv_general_dilated is jax.lax.conv_general_dilated
    with pytest.raises(ValueError, match="conv_weight_grad must be one of 'auto', 'xla', 'matmul'"):
        models.create("cifar_resnet8", num_classes=2, rngs=nnx.Rngs(0), conv_weight_grad="fast")
