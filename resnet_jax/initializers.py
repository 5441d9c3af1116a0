"""The networks' initial weights, drawn without an XLA compilation per weight shape.

Sec. 3.4 initialises the weights "as in [13]" (He et al. 2015, "Delving Deep into Rectifiers"):
zero-mean Gaussians of variance 2 / fan (`he_normal`). `jax.nn.initializers` draw each weight
with a jax.random call that XLA compiles once per shape; a network has dozens of shapes, and
creating one spent seconds compiling them (benchmarks/README.md, "Creating a network"). Here a
weight is drawn as consecutive blocks of BLOCK standard samples, block i from the weight's key
folded with i, by one function compiled once per distribution; the blocks are joined, cut to
size and scaled on the host. Under a trace (jit, eval_shape, vmap) the same blocks are joined
with jax.numpy: a network has the same weights whether it is created eagerly or traced.
"""

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 1 << 14  # samples per draw: small weights draw little more than they need
# The standard deviation of a standard normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@functools.partial(jax.jit, static_argnums=0)
def _block(distribution: str, key: jax.Array, index: jax.Array) -> jax.Array:
    key = jax.random.fold_in(key, index)
    if distribution == "normal":
        return jax.random.normal(key, (BLOCK,), jnp.float32)
    return jax.random.truncated_normal(key, -2.0, 2.0, (BLOCK,), jnp.float32)


def _drawn(distribution: str, key: jax.Array, shape: tuple[int, ...], dtype: Any,
           stddev: float) -> jax.Array:
    size = math.prod(shape)
    blocks = [_block(distribution, key, i) for i in range(-(-size // BLOCK))]
    if isinstance(key, jax.core.Tracer):
        return (jnp.concatenate(blocks)[:size].reshape(shape) * np.float32(stddev)).astype(dtype)
    values = np.concatenate(jax.device_get(blocks))[:size].reshape(shape) * np.float32(stddev)
    return jax.device_put(values.astype(dtype))


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """Zero-mean weights of variance scale / fan, as `jax.nn.initializers.variance_scaling`
    defines them for a kernel whose last two axes are its inputs and outputs: fan is "fan_in" or
    "fan_out" times the receptive field; `distribution` is "normal" or "truncated_normal" (cut
    at two standard deviations, then rescaled to the variance)."""
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        receptive_field = math.prod(shape[:-2])
        fan = {"fan_in": shape[-2], "fan_out": shape[-1]}[mode] * receptive_field
        stddev = math.sqrt(scale / fan)
        if distribution == "truncated_normal":
            stddev /= _TRUNCATED_STD
        return _drawn(distribution, key, shape, dtype, stddev)
    return init


def he_normal(mode: str) -> Initializer:
    """Sec. 3.4's initialisation of the convolutions ([13]): N(0, 2 / fan)."""
    return variance_scaling(2.0, mode, "normal")


def lecun_normal() -> Initializer:
    """Flax's default for a Linear layer's kernel (the classifier's): variance 1 / fan_in,
    truncated."""
    return variance_scaling(1.0, "fan_in", "truncated_normal")


def normal(stddev: float) -> Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return _drawn("normal", key, shape, dtype, stddev)
    return init


def filled(shape: tuple[int, ...], value: float, dtype: Any) -> jax.Array:
    """An array of `value`, made on the host (jnp.full, even jnp.asarray, compile once per
    shape)."""
    return jax.device_put(np.full(shape, value, dtype))


def constant(value: float) -> Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        del key
        return filled(shape, value, dtype)
    return init
