"""A 2-D convolution whose kernel gradient is computed as matrix products, for XLA's CPU backend.

XLA's CPU backend computes the kernel (weight) gradient of a convolution far slower than the
same sums written as matrix products: for ResNet-50's 1x1 convolutions on 56x56 maps 24-27x
slower, for 3x3 convolutions 1.5-3.8x (`python -m benchmarks.conv_grad`; benchmarks/README.md,
"Convolution kernel gradients"), and the kernel gradients dominated the training step on CPU. The kernel gradient of a k x k
convolution is, for each tap (i, j), the product of the input window that tap sees with the
output gradient, summed over batch and positions:

    dW[i, j] = X_ij^T G,   X_ij: (batch * positions, in),  G: (batch * positions, out)

`conv_general_dilated` computes the convolution itself and its input gradient (`input_gradient`)
with XLA's own convolutions; only the kernel gradient is replaced. It takes the arguments that
`nnx.Conv` passes to `jax.lax.conv_general_dilated`, and supports what the networks here use:
NHWC inputs, HWIO kernels, no dilation, no feature groups.
"""

import functools

import jax
import jax.numpy as jnp

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, strides, padding, precision):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSIONS,
                                        precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_grad(x, kernel, strides, padding, precision):
    return _conv(x, kernel, strides, padding, precision)


def _forward(x, kernel, strides, padding, precision):
    return _conv(x, kernel, strides, padding, precision), (x, kernel)


def kernel_gradient(x, grad, kernel_shape, strides, padding, precision=None):
    """The gradient of the convolution's kernel: one matrix product per tap, accumulated in float32."""
    (kh, kw, cin, cout), (sh, sw) = kernel_shape, strides
    batch, out_h, out_w, _ = grad.shape
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    grad = grad.reshape(-1, cout)
    taps = []
    for i in range(kh):
        for j in range(kw):
            window = jax.lax.slice(x, (0, i, j, 0),
                                   (batch, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, cin),
                                   (1, sh, sw, 1))
            taps.append(jax.lax.dot_general(window.reshape(-1, cin), grad, (((0,), (0,)), ((), ())),
                                            precision=precision,
                                            preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh, kw, cin, cout)


def input_gradient(grad, kernel, input_shape, strides, padding, precision=None):
    """The gradient of the convolution's input: the output gradient, dilated by the stride,
    convolved with the kernel turned by 180 degrees and its in/out channels swapped. Written out
    rather than asked of `jax.vjp`, whose tracing, once per convolution, took about 30% of the
    unrolled ResNet-152 train step's trace (under cProfile, 7.5-8.0 s against 5.5 s without)."""
    kh, kw = kernel.shape[:2]
    pads = []
    for size, k, s, (lo, hi), out in zip(input_shape[1:3], (kh, kw), strides, padding,
                                         grad.shape[1:3]):
        uncovered = size + lo + hi - k - (out - 1) * s  # input rows no output reads
        pads.append((k - 1 - lo, k - 1 - hi + uncovered))
    turned = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    return jax.lax.conv_general_dilated(grad, turned, (1, 1), pads, lhs_dilation=strides,
                                        dimension_numbers=_DIMENSIONS, precision=precision)


def _backward(strides, padding, precision, residuals, grad):
    x, kernel = residuals
    grad_x = input_gradient(grad, kernel, x.shape, strides, padding, precision).astype(x.dtype)
    grad_kernel = kernel_gradient(x, grad, kernel.shape, strides, padding, precision)
    return grad_x, grad_kernel.astype(kernel.dtype)


_conv_matmul_grad.defvjp(_forward, _backward)
# Jitted so that JAX traces, differentiates and lowers each shape once, however many layers share it.
_conv_matmul_grad_jit = jax.jit(_conv_matmul_grad, static_argnums=(2, 3, 4))


def conv_general_dilated(x, kernel, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`jax.lax.conv_general_dilated` for NHWC/HWIO convolutions, kernel gradient by matrix products."""
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    specs = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _DIMENSIONS)
    if (dilated or feature_group_count != 1 or kwargs.get("preferred_element_type") is not None
            or isinstance(padding, str) or x.ndim != 4
            or (dimension_numbers is not None and jax.lax.conv_dimension_numbers(
                x.shape, kernel.shape, dimension_numbers) != specs)):
        raise ValueError("conv_weight_grad='matmul' supports 2-D NHWC/HWIO convolutions with "
                         "explicit padding, no dilation and no feature groups")
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _conv_matmul_grad_jit(x, kernel, tuple(window_strides), padding, precision)
