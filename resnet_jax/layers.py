"""The layers every network here is made of: batch normalisation and convolutions with the
options they share (`Layers`), and the checks of option values, each a one-line ValueError that
names the option. `models` (ResNets) and `vgg` build on this module.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from resnet_jax import cpu

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
        self.scale = nnx.Param(jnp.full((features,), 0.0 if zero_init else 1.0, param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
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
        # tracer for its sharding makes JAX search the whole trace for an error message, which
        # took half of the unrolled ResNet-152 train step's trace (6.2 of 12.5 s).
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

    def conv(self, in_features: int, out_features: int, size: int, stride: int,
             rngs: nnx.Rngs, bias: float | None = None) -> nnx.Conv:
        """A size x size convolution; with `bias`, it has a bias initialised to that value (the
        highway gate's and VGG's convolutions, which no BN follows or which keep torchvision's)."""
        pad = (size - 1) // 2
        return nnx.Conv(
            in_features, out_features, (size, size), (stride, stride),
            padding=((pad, pad), (pad, pad)), use_bias=bias is not None, dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=jax.nn.initializers.variance_scaling(2.0, self.init_fan, "normal"),
            bias_init=jax.nn.initializers.constant(0.0 if bias is None else bias),
            conv_general_dilated=(cpu.conv_general_dilated if self.conv_weight_grad == "matmul"
                                  else jax.lax.conv_general_dilated),
            rngs=rngs)

    def bn(self, features: int, zero_init: bool = False) -> BatchNorm:
        return BatchNorm(features, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                         group_size=self.bn_group_size, zero_init=zero_init, dtype=self.dtype,
                         param_dtype=self.param_dtype)


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
