"""What exists only for XLA's CPU backend: its fusion flag, convolution kernel gradients as
matrix products, and rematerialisation that survives its passes. The models choose these where
`in_use()`, that is where JAX's default backend is the CPU; on GPUs and TPUs they run plain
`jax.lax` convolutions and `jax.checkpoint`.

**Fusion** (`set_cpu_fusion`). By default XLA's CPU backend fuses an elementwise producer into
every consumer, recomputing it in each: a ResNet's residual stream (ReLU of the shortcut plus BN
of the branch, block after block) is then recomputed back to the start of its stage inside every
fusion that reads it, in the forward pass and in each ReLU's backward pass (the unrolled
ResNet-152 train step). With multi-output fusion on, XLA fuses without duplicating: shorter
steps and compiles (benchmarks/README.md, "Training step"). The option's key names the CPU
backend; other backends ignore it.

**Kernel gradients** (`conv_general_dilated`). XLA's CPU backend computes the kernel (weight)
gradient of a convolution far slower than the same sums written as matrix products: for
ResNet-50's 1x1 convolutions on 56x56 maps 24-27x slower, for 3x3 convolutions 1.5-3.8x
(`python -m benchmarks.conv_grad`; benchmarks/README.md, "Convolution kernel gradients"), and the
kernel gradients dominated the training step on CPU. The kernel gradient of a k x k convolution
is, for each tap (i, j), the product of the input window that tap sees with the output gradient,
summed over batch and positions:

    dW[i, j] = X_ij^T G,   X_ij: (batch * positions, in),  G: (batch * positions, out)

The convolution itself and its input gradient (`input_gradient`) stay XLA's own convolutions. It
takes the arguments that `nnx.Conv` passes to `jax.lax.conv_general_dilated`, and supports what
the networks here use: NHWC inputs, HWIO kernels, no dilation, no feature groups.

**Rematerialisation** (`rematerialised`). `jax.checkpoint` keeps the recomputation apart from the
forward pass with optimisation barriers. XLA's CPU backend removes them before its last
common-subexpression pass, which then merges the recomputation back into the forward pass: the
compiled program keeps every activation, as without remat (CIFAR ResNet-56, batch 128: 2,922 MB
of temporaries against 2,920 MB without). Here the recomputation reads its input through a zero
made from the output's cotangent, a true data dependence: no compiler can merge it with the
forward pass or run it before the cotangent exists (the same network: 298 MB).
"""

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

CPU_FUSION = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


def in_use() -> bool:
    """Whether JAX's default backend is the CPU: the workarounds here are chosen then only."""
    return jax.default_backend() == "cpu"


def set_cpu_fusion(environ=os.environ) -> None:
    """Adds `CPU_FUSION` to XLA_FLAGS unless XLA_FLAGS already sets backend extra options (then
    the user's choice stands). XLA reads its flags when JAX starts its first backend: call this
    before that; after it, it changes nothing."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_backend_extra_options" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {CPU_FUSION}".strip()


def rematerialised(forward: Callable[[Any, jax.Array], tuple[jax.Array, Any]]):
    """`forward(state, x) -> (y, aux)` as a function that saves only (state, x) for the backward
    pass and runs `forward` again there, once y's cotangent is known. `aux` (BN's running
    statistics) gets no gradient. Forward-mode differentiation (`jax.jvp`) is not defined for it.
    """
    @jax.custom_vjp
    def run(state, x):
        return forward(state, x)

    def run_forward(state, x):
        return forward(state, x), (state, x)

    def run_backward(saved, cotangents):
        state, x = saved
        dy = cotangents[0]
        # 0 x the first element of each example's dy: zero unless dy holds an inf or a nan, and
        # then the gradients are not finite anyway. XLA does not fold a float product with zero
        # (it would change nans). Per example, so that under a batch-sharded mesh each device
        # reads its own examples and no collective is added.
        first = dy[(slice(None),) + (slice(0, 1),) * (dy.ndim - 1)]
        x = x + (first * 0).reshape(first.shape[:1] + (1,) * (x.ndim - 1)).astype(x.dtype)
        _, pullback = jax.vjp(lambda state, x: forward(state, x)[0], state, x)
        return pullback(dy)

    run.defvjp(run_forward, run_backward)
    return run


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
    rather than asked of `jax.vjp`, whose tracing, once per convolution, was a large part of a
    deep network's trace."""
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
