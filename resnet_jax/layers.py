"""The layers every network here is made of: batch normalisation and convolutions with the
options they share (`Layers`), the classifier (float32, HIGHEST precision), and the checks of
option values, each a one-line ValueError that names the option. In mixed precision (bfloat16
compute, float32 parameters) convolutions and dense layers give their parameters float32
gradients (`mixed_conv`, `mixed_dot`), so that devices sum gradients in float32. `models`
(ResNets) and `vgg` build on this module.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from resnet_jax import cpu
from resnet_jax.initializers import constant, filled, he_normal, lecun_normal

INIT_FANS = ("fan_in", "fan_out")
# The name of training BN's batch statistics, which rematerialisation keeps (models._rematerialised).
BN_STATISTICS = "bn_statistics"
CONV_WEIGHT_GRADS = ("auto", "xla", "matmul")


def check_choice(field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer; got {value!r}")


def floating_dtype(field: str, value: Any) -> jnp.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{field} must be a floating dtype (float32, bfloat16, float16); got {value!r}")
    return dtype


def compute_dtype(value: Any, backend: str | None = None) -> jnp.dtype:
    """The dtype convolutions and activations compute in, from the `dtype` option.

    "auto" is mixed precision where it pays: bfloat16 on GPUs and TPUs (half the activation
    memory and traffic, their fast matrix units), float32 on the CPU, where bfloat16 is slower.
    Parameters, optimizer state, BN statistics, logits and the loss stay float32 either way.
    float16 is refused: its narrow range needs loss scaling, which training here does not do.
    """
    if value == "auto":
        return jnp.dtype(jnp.float32 if (backend or jax.default_backend()) == "cpu" else jnp.bfloat16)
    dtype = floating_dtype("dtype", value)
    if dtype == jnp.float16:
        raise ValueError("dtype (model.dtype) 'float16' needs loss scaling, which training here "
                         "does not do; use 'auto', 'bfloat16' or 'float32'")
    return dtype


class BatchNorm(nnx.Module):
    """Batch normalisation (Ioffe and Szegedy 2015), after every convolution (Sec. 3.4).

    In training the statistics are those of the whole batch, or, with `group_size`, of each
    group of that many consecutive examples ("ghost" batch norm). The paper trained on 8 GPUs
    with 32 images each and normalised per GPU (Sec. 3.4); `group_size=32` reproduces that,
    and because each group lies on one device no cross-device reduction is needed; nor for the
    running statistics, which the train loop keeps per device (`running_stats`). The running
    statistics move towards the mean over groups: running = momentum * running +
    (1 - momentum) * batch (Flax's convention; torch's momentum 0.1 is 0.9 here), the variance
    unbiased. Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, features: int, *, momentum: float, epsilon: float,
                 group_size: int | None, zero_init: bool, dtype: Any, param_dtype: Any):
        self.scale = nnx.Param(filled((features,), 0.0 if zero_init else 1.0, param_dtype))
        self.bias = nnx.Param(filled((features,), 0.0, param_dtype))
        self.mean = nnx.BatchStat(filled((features,), 0.0, jnp.float32))
        self.var = nnx.BatchStat(filled((features,), 1.0, jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.group_size = group_size
        self.dtype = dtype
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        running_mean, running_var = self.mean[...], self.var[...]
        if self.use_running_average:
            return _normalise_by_running(x, self.scale[...], self.bias[...], running_mean, running_var,
                                         self.epsilon, self.dtype)
        y, mean, var = _normalise_training(x, self.scale[...], self.bias[...], running_mean, running_var,
                                           self.group_size or x.shape[0], self.momentum, self.epsilon,
                                           self.dtype)
        # set_value, not `[...] =`: Flax's indexed assignment compares shardings, and asking a
        # tracer for its sharding makes JAX search the whole trace for an error message.
        self.mean.set_value(mean)
        self.var.set_value(var)
        return y


# The two BN computations are jitted functions of their arrays so that JAX traces, differentiates
# and lowers each shape once, however many layers share it (ResNet-152 has 155 BNs of 9 shapes).
@functools.partial(jax.jit, static_argnums=(5, 6))
def _normalise_by_running(x, scale, bias, running_mean, running_var, epsilon, dtype):
    if running_mean.ndim == 2:  # per-device statistics (running_stats.spread)
        running_mean, running_var = running_mean.mean(0), running_var.mean(0)
    y = (x.astype(jnp.float32) - running_mean) * jax.lax.rsqrt(running_var + epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _normalise_training(x, scale, bias, running_mean, running_var, group, momentum, epsilon, dtype):
    """(y, new running mean, new running variance) of training BN over groups of `group` examples."""
    batch, channels = x.shape[0], x.shape[-1]
    if batch % group:
        raise ValueError(f"bn_group_size={group} must divide the batch size {batch}")
    # Averaged over all groups, or with per-device statistics, (devices, channels), over each
    # device's own groups: consecutive groups lie on one device.
    copies = running_mean.shape[0] if running_mean.ndim == 2 else 1
    if (batch // group) % copies:
        raise ValueError(f"the {batch // group} BN groups do not split over {copies} devices")
    grouped = x.reshape((batch // group, group) + x.shape[1:])
    # Each group's statistics are taken about its running mean (one per device's groups), a
    # constant near the batch mean that keeps the variance from E[x^2] - E[x]^2 accurate.
    shift = jnp.repeat(running_mean, batch // group // copies, axis=0) if copies > 1 else running_mean
    y, mean, var = _normalise_groups(grouped, scale.astype(jnp.float32), bias.astype(jnp.float32),
                                     shift, epsilon)
    # The running variance is the unbiased estimate, as Caffe's and torch's BN keep it.
    count = grouped.size // grouped.shape[0] // channels
    unbiased = var * (count / max(count - 1, 1))
    mean, unbiased = (s.reshape((copies, -1, channels)).mean(1).reshape(running_mean.shape)
                      for s in (mean, unbiased))
    return (y.reshape(x.shape).astype(dtype), momentum * running_mean + (1 - momentum) * mean,
            momentum * running_var + (1 - momentum) * unbiased)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _normalise_groups(x, scale, bias, shift, epsilon):
    """Training BN of x, (groups, group, ..., channels), by each group's statistics: (y in
    float32, mean and biased variance per group, (groups, channels)). `shift`, (channels,) or
    (groups, channels), changes only the rounding of the statistics. The statistics are
    outputs for the running averages only; no gradient flows back through them."""
    return _normalise_forward(x, scale, bias, shift, epsilon)[0]


def _sums(a: jax.Array, b: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """a and b summed over `axes` as one reduction: where the batch is sharded over devices,
    one all-reduce per BN, not two one after the other (each a pod-wide wait)."""
    both = jnp.stack([a, b]).sum(tuple(axis + 1 for axis in axes), keepdims=True)
    return both[0], both[1]


def _normalise_forward(x, scale, bias, shift, epsilon):
    axes = tuple(range(1, x.ndim - 1))
    count = x.size // x.shape[0] // x.shape[-1]
    shift = shift.reshape((-1,) + (1,) * (x.ndim - 2) + shift.shape[-1:])
    centred = x.astype(jnp.float32) - shift
    total, squares = _sums(centred, jnp.square(centred), axes)
    offset = total / count
    mean = shift + offset
    var = jnp.maximum(squares / count - jnp.square(offset), 0.0)
    mean, var = checkpoint_name(mean, BN_STATISTICS), checkpoint_name(var, BN_STATISTICS)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x.astype(jnp.float32) - mean) * rstd * scale + bias
    flat = (x.shape[0], x.shape[-1])
    return (y, mean.reshape(flat), var.reshape(flat)), (x, mean, rstd, scale)


def _normalise_backward(epsilon, residuals, cotangents):
    # The textbook gradient, two sums per group taken as one reduction (Ioffe and Szegedy 2015,
    # Sec. 3); JAX differentiating the forward pass gave five reductions more per BN (the scanned
    # ResNet-152 train step, lowered: 483 reduce ops against 338 with this):
    # dx = scale * rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)).
    x, mean, rstd, scale = residuals
    dy = cotangents[0]
    axes = tuple(range(1, x.ndim - 1))
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    sum_dy, sum_dy_x_hat = _sums(dy, dy * x_hat, axes)
    count = x.size // x.shape[0] // x.shape[-1]
    dx = (scale * rstd) * (dy - (sum_dy + x_hat * sum_dy_x_hat) / count)
    all_but_channels = tuple(range(x.ndim - 1))
    return (dx.astype(x.dtype), sum_dy_x_hat.sum(all_but_channels), sum_dy.sum(all_but_channels),
            None)


_normalise_groups.defvjp(_normalise_forward, _normalise_backward)


@dataclasses.dataclass(frozen=True)
class Layers:
    """Makes every convolution and BN of a network, with the options they all share.

    Convolutions have no bias (BN follows each) and symmetric padding of (k - 1) // 2, as the
    paper's Caffe models and torchvision: "SAME" padding would pad asymmetrically at stride 2
    and shift every feature map by one pixel against converted weights. Their kernels are
    initialised as the paper's reference [13] (He et al. 2015, "Delving Deep into Rectifiers",
    Eq. 10): a zero-mean Gaussian of standard deviation sqrt(2 / n), with n = k * k * (input
    channels) ("fan_in", [13]'s forward case and Caffe's MSRA filler) or k * k * (output
    channels) ("fan_out", [13]'s backward case, torchvision's choice).
    """

    bn_momentum: float
    bn_epsilon: float
    bn_group_size: int | None
    dtype: Any
    param_dtype: Any
    init_fan: str
    conv_weight_grad: str = "xla"

    @property
    def mixed(self) -> bool:
        """Whether the compute dtype is narrower than the parameters' (bfloat16 and float32)."""
        return jnp.finfo(self.dtype).bits < jnp.finfo(self.param_dtype).bits

    def conv(self, in_features: int, out_features: int, size: int, stride: int,
             rngs: nnx.Rngs, bias: float | None = None) -> nnx.Conv:
        """A size x size convolution; with `bias`, it has a bias initialised to that value (the
        highway gate's and VGG's convolutions, which no BN follows or which keep torchvision's).
        In mixed precision its kernel and bias get float32 gradients (`MixedConv`)."""
        pad = (size - 1) // 2
        matmul = self.conv_weight_grad == "matmul"
        if self.mixed:
            kind = functools.partial(MixedConv, conv_general_dilated=functools.partial(
                mixed_conv, matmul=matmul), promote_dtype=_cast_input)
        else:
            kind = functools.partial(nnx.Conv, conv_general_dilated=(
                cpu.conv_general_dilated if matmul else jax.lax.conv_general_dilated))
        return kind(
            in_features, out_features, (size, size), (stride, stride),
            padding=((pad, pad), (pad, pad)), use_bias=bias is not None, dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=he_normal(self.init_fan),
            bias_init=constant(0.0 if bias is None else bias),
            rngs=rngs)

    def dense(self, in_features: int, out_features: int, rngs: nnx.Rngs,
              **initializers: Any) -> nnx.Linear:
        """A fully connected layer in the compute dtype (VGG's hidden layers); in mixed precision
        its kernel and bias get float32 gradients (`MixedLinear`). `initializers`: nnx.Linear's."""
        kind = (functools.partial(MixedLinear, dot_general=mixed_dot, promote_dtype=_cast_input)
                if self.mixed else nnx.Linear)
        return kind(in_features, out_features, dtype=self.dtype, param_dtype=self.param_dtype,
                    rngs=rngs, **initializers)

    def bn(self, features: int, zero_init: bool = False) -> BatchNorm:
        return BatchNorm(features, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                         group_size=self.bn_group_size, zero_init=zero_init, dtype=self.dtype,
                         param_dtype=self.param_dtype)


def classifier(in_features: int, num_classes: int, param_dtype: Any, rngs: nnx.Rngs,
               **initializers: Any) -> nnx.Linear:
    """The last fully connected layer, whose outputs are the logits: float32 at HIGHEST precision
    whatever the compute dtype (DEFAULT would make it TF32 on GPUs and one-pass bfloat16 on
    TPUs), since the logits feed the softmax. `initializers`: nnx.Linear's; by default Flax's."""
    initializers = {"kernel_init": lecun_normal(),
                    "bias_init": constant(0.0), **initializers}
    return nnx.Linear(in_features, num_classes, dtype=jnp.float32, param_dtype=param_dtype,
                      precision=jax.lax.Precision.HIGHEST, rngs=rngs, **initializers)


# Mixed precision. nnx.Conv and nnx.Linear cast their kernel to the compute dtype before the
# product, so the kernel's gradient is a bfloat16 sum over the batch: under a batch-sharded mesh
# XLA's partitioner all-reduces that bfloat16 partial sum across the devices (8 bits of
# mantissa). Here the product takes the float32 kernel and casts it itself, and its gradient
# is computed from the same bfloat16 operands but accumulated and returned in float32
# (`preferred_element_type`: matrix units accumulate bf16 x bf16 in float32 anyway), so the
# cross-device sum is float32, as PyTorch AMP with DDP sums its float32 gradients. The input
# gradient stays bfloat16. The bias stays float32 too and the layer's output is cast back.

class _InComputeDtype:
    """A layer whose output is cast to its compute dtype: its float32 bias, added last, makes
    the sum float32, and the cast's transpose hands the bias a float32 cotangent to sum."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding)
        return y if y.dtype == self.dtype else y.astype(self.dtype)


class MixedConv(_InComputeDtype, nnx.Conv):
    """nnx.Conv for mixed precision: float32 kernel and bias gradients, output in the compute
    dtype. The same parameters and attributes as nnx.Conv."""


class MixedLinear(_InComputeDtype, nnx.Linear):
    """nnx.Linear for mixed precision, as `MixedConv`."""


def _cast_input(args: tuple, *, dtype: Any = None, inexact: bool = True) -> tuple:
    """flax's promote_dtype for mixed layers: the input cast to the compute dtype, the kernel
    and bias left in the parameter dtype (the product casts the kernel)."""
    x, *params = args
    return (x if dtype is None else jnp.asarray(x, dtype), *params)


_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, strides, padding, precision):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSIONS,
                                        precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _mixed_conv(x, kernel, strides, padding, precision, matmul):
    return _conv(x, kernel.astype(x.dtype), strides, padding, precision)


def _mixed_conv_forward(x, kernel, strides, padding, precision, matmul):
    return _mixed_conv(x, kernel, strides, padding, precision, matmul), (x, kernel)


def _mixed_conv_backward(strides, padding, precision, matmul, residuals, grad):
    x, kernel = residuals
    low = kernel.astype(x.dtype)
    if matmul:  # XLA's CPU backend (`cpu.conv_general_dilated`): one product per tap
        grad_x = cpu.input_gradient(grad, low, x.shape, strides, padding, precision).astype(x.dtype)
        grad_kernel = cpu.kernel_gradient(x, grad, low.shape, strides, padding, precision)
    else:  # JAX's own transposition, as nnx.Conv differentiates today
        (grad_x,) = jax.vjp(lambda x: _conv(x, low, strides, padding, precision), x)[1](grad)
        grad_kernel = kernel_gradient(x, grad, low.shape, strides, padding, precision)
    return grad_x, grad_kernel.astype(kernel.dtype)


_mixed_conv.defvjp(_mixed_conv_forward, _mixed_conv_backward)
# Jitted so that JAX traces, differentiates and lowers each shape once, however many layers share it.
_mixed_conv_jit = jax.jit(_mixed_conv, static_argnums=(2, 3, 4, 5))


def kernel_gradient(x, grad, kernel_shape, strides, padding, precision=None):
    """The kernel gradient of an NHWC/HWIO convolution (explicit padding, no dilation) in float32:
    the convolution of its input with its output gradient that JAX's transposition makes (the
    batch contracted, the forward strides as the kernel's dilation), accumulating in float32."""
    pads = []
    for size, k, s, (lo, _), out in zip(x.shape[1:3], kernel_shape[:2], strides, padding,
                                         grad.shape[1:3]):
        # The high side reaches the last input row the last output reads (negative: rows unread).
        pads.append((lo, (out - 1) * s + k - size - lo))
    return jax.lax.conv_general_dilated(
        x, grad, (1, 1), pads, rhs_dilation=strides, dimension_numbers=("CHWN", "IHWO", "HWNC"),
        precision=precision, preferred_element_type=jnp.float32)


def mixed_conv(x, kernel, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None, matmul=False,
               **kwargs):
    """`jax.lax.conv_general_dilated` (as nnx.Conv calls it) of x in the compute dtype with a
    float32 kernel, cast to x's dtype for the product; the kernel gradient is float32 (module
    comment above), by XLA's convolution or, with `matmul`, `cpu.kernel_gradient`'s products.
    NHWC/HWIO, explicit padding, no dilation, no feature groups: what the networks here use."""
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    specs = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _DIMENSIONS)
    if (dilated or feature_group_count != 1 or kwargs.get("preferred_element_type") is not None
            or kwargs.get("out_sharding") is not None or isinstance(padding, str) or x.ndim != 4
            or (dimension_numbers is not None and jax.lax.conv_dimension_numbers(
                x.shape, kernel.shape, dimension_numbers) != specs)):
        raise ValueError("mixed precision convolutions support 2-D NHWC/HWIO convolutions with "
                         "explicit padding, no dilation and no feature groups")
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _mixed_conv_jit(x, kernel, tuple(window_strides), padding, precision, matmul)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_dot(x, kernel, precision):
    return jnp.matmul(x, kernel.astype(x.dtype), precision=precision)


def _mixed_dot_forward(x, kernel, precision):
    return _mixed_dot(x, kernel, precision), (x, kernel)


def _mixed_dot_backward(precision, residuals, grad):
    x, kernel = residuals
    grad_x = jnp.matmul(grad, kernel.astype(x.dtype).T, precision=precision)
    batch = tuple(range(x.ndim - 1))
    grad_kernel = jax.lax.dot_general(x, grad, ((batch, batch), ((), ())), precision=precision,
                                      preferred_element_type=jnp.float32)
    return grad_x, grad_kernel.astype(kernel.dtype)


_mixed_dot.defvjp(_mixed_dot_forward, _mixed_dot_backward)


def mixed_dot(x, kernel, dimension_numbers, precision=None, preferred_element_type=None,
              out_sharding=None):
    """`jax.lax.dot_general` as nnx.Linear calls it (x's last axis against the kernel's first),
    with the kernel cast to x's dtype and its gradient float32, as `mixed_conv`."""
    if (dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or kernel.ndim != 2
            or preferred_element_type is not None or out_sharding is not None):
        raise ValueError("mixed precision dense layers support x @ kernel alone")
    return _mixed_dot(x, kernel, precision)


def make_layers(*, bn_momentum: float, bn_epsilon: float, bn_group_size: int | None, dtype: Any,
                param_dtype: Any, init_fan: str, conv_weight_grad: str) -> Layers:
    """`Layers` from the options a network's constructor takes, each checked.

    conv_weight_grad "auto" is "matmul" when the default backend is the CPU and "xla" elsewhere
    (see `resnet_jax.cpu`); dtype "auto" is bfloat16 on GPUs and TPUs, float32 on the CPU
    (`compute_dtype`).
    """
    check_choice("init_fan", init_fan, INIT_FANS)
    check_choice("conv_weight_grad", conv_weight_grad, CONV_WEIGHT_GRADS)
    if conv_weight_grad == "auto":
        conv_weight_grad = "matmul" if cpu.in_use() else "xla"
    if bn_group_size is not None:
        check_positive_int("bn_group_size", bn_group_size)
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1); got {bn_momentum!r}")
    if not bn_epsilon > 0.0:
        raise ValueError(f"bn_epsilon must be positive; got {bn_epsilon!r}")
    return Layers(bn_momentum, bn_epsilon, bn_group_size, compute_dtype(dtype),
                  floating_dtype("param_dtype", param_dtype), init_fan, conv_weight_grad)


def check_images(x: jax.Array, in_channels: int) -> None:
    """A batch of NHWC images with `in_channels` channels, or a one-line ValueError."""
    if x.ndim != 4:
        raise ValueError(f"input must be a batch of images, NHWC (rank 4); got shape {tuple(x.shape)}")
    if x.shape[-1] != in_channels:
        raise ValueError(f"input must have in_channels={in_channels} channels (NHWC, last "
                         f"axis); got shape {tuple(x.shape)}")
