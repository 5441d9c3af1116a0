"""The networks' initial weights, drawn on the host: no XLA compilation, no per-sample cost of
JAX's counter-based generator on a CPU host.

Sec. 3.4 initialises the weights "as in [13]" (He et al. 2015, "Delving Deep into Rectifiers"):
zero-mean Gaussians of variance 2 / fan (`he_normal`). `jax.nn.initializers` draw each weight
with a jax.random call that XLA compiles once per shape, and creating a network spent seconds
compiling them (benchmarks/README.md, "Creating a network"). Here a weight is drawn by NumPy's
default generator seeded with its JAX key's data, so a key still names one weight. Under a trace
(jit, vmap) the same draw runs as a host callback: a network has the same weights whether it is
created eagerly or traced. Every host of a pod draws the same weights from the same seed (its
hosts run one NumPy).
"""

import concurrent.futures
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

TRUNCATION = 2.0  # truncated normals are cut at two standard deviations
CHUNK = 1 << 20  # samples per seed: a large weight's chunks are drawn in parallel
# The standard deviation of a standard normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def _samples(distribution: str, key_data: np.ndarray, size: int, stddev: float) -> np.ndarray:
    """`size` float32 samples of N(0, stddev^2), or of it truncated to +-TRUNCATION standard
    normal deviations before scaling (outliers drawn again until none is left). A large weight
    is drawn in chunks of CHUNK, each from its own seed, on threads: the same samples on any
    machine, whatever its cores."""
    seed = np.asarray(key_data, np.uint32).ravel().tolist()
    values = _aligned(size)

    def fill(start: int) -> None:
        generator = np.random.default_rng([*seed, start // CHUNK])
        chunk = values[start:start + CHUNK]
        generator.standard_normal(out=chunk, dtype=np.float32)
        if distribution == "truncated_normal":
            outside = np.flatnonzero(np.abs(chunk) > TRUNCATION)
            while outside.size:
                chunk[outside] = generator.standard_normal(outside.size, np.float32)
                outside = outside[np.abs(chunk[outside]) > TRUNCATION]
        chunk *= np.float32(stddev)

    starts = range(0, size, CHUNK)
    if len(starts) == 1:
        fill(0)
    else:
        list(_threads().map(fill, starts))
    return values


def _aligned(size: int) -> np.ndarray:
    """An empty float32 array on a 64-byte boundary, which jax.device_put on a CPU takes
    without a copy."""
    raw = np.empty(4 * size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + 4 * size].view(np.float32)


@functools.cache
def _threads() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(thread_name_prefix="initializers")


def _drawn(distribution: str, key: jax.Array, shape: tuple[int, ...], dtype: Any,
           stddev: float) -> jax.Array:
    def draw(key_data):
        values = _samples(distribution, key_data, math.prod(shape), stddev)
        return values.reshape(shape).astype(dtype, copy=False)

    key_data = jax.random.key_data(key)
    if isinstance(key, jax.core.Tracer):
        return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), key_data,
                                 vmap_method="sequential")
    return jax.device_put(draw(jax.device_get(key_data)))


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """Zero-mean weights of variance scale / fan, as `jax.nn.initializers.variance_scaling`
    defines them for a kernel whose last two axes are its inputs and outputs: fan is "fan_in" or
    "fan_out" times the receptive field; `distribution` is "normal" or "truncated_normal" (cut
    at TRUNCATION standard deviations, then rescaled to the variance)."""
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
