"""A checksum of each array of a checkpoint, and whether it is finite: `on_devices` or `on_host`.

orbax 0.12.8 and tensorstore verify no array data (zarr3's crc32c covers only the shard index,
and orbax fixes the codecs), so a flipped byte restored silently; checkpoint.py saves these in
each step's metadata and compares them at restore.

The same arithmetic runs as jax.numpy on the devices (a training run's saves and restores: each
device sums its own shards, global reductions, one compile per state) and as numpy on the host
(reading a checkpoint whole: no compile, which on a CPU costs more than the reading).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _mix(x):
    """MurmurHash3's finaliser: a bijection of uint32 that spreads each input bit over all 32."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(leaf, xp):
    """The leaf's bits as uint32 words, shape leaf.shape + (words per element,); a key array's
    are its key data."""
    if _is_key(leaf):
        return xp.asarray(jax.random.key_data(leaf))
    if leaf.dtype == np.bool_:
        return leaf.astype(xp.uint32)[..., None]
    size = leaf.dtype.itemsize
    unsigned = {1: np.uint8, 2: np.uint16}.get(size, np.uint32)
    if xp is np:  # a view of a trailing axis: 64-bit elements become two words
        return np.ascontiguousarray(leaf)[..., None].view(unsigned).astype(np.uint32)
    words = jax.lax.bitcast_convert_type(leaf, unsigned)  # adds the trailing axis only for 64 bits
    return (words if size > 4 else words[..., None]).astype(jnp.uint32)


def _checksum(words, xp):
    """Sum mod 2**32 of mix(word + mix(position)). Each term is a bijection of its word, so any
    change of one element changes the sum; the position in it makes moved elements count too."""
    position = xp.zeros(words.shape, xp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the row-major index from broadcast ranges: no reshape of shards
        index = xp.arange(words.shape[axis], dtype=xp.uint32)
        position = position + index.reshape([-1 if a == axis else 1 for a in range(words.ndim)]) * np.uint32(stride)
        stride = stride * words.shape[axis] % 2**32
    return xp.sum(_mix(words + _mix(position)), dtype=xp.uint32)


def _is_key(leaf) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


@jax.jit
def on_devices(tree: Any) -> tuple[jax.Array, jax.Array]:
    """(checksum, all finite) of each leaf, in the order of jax.tree.leaves; global reductions, so
    every process gets the same values. From the main thread."""
    leaves = jax.tree.leaves(tree)
    checksums = jnp.stack([_checksum(_words(leaf, jnp), jnp) for leaf in leaves])
    finite = jnp.stack([jnp.isfinite(leaf).all() if jnp.issubdtype(leaf.dtype, jnp.inexact)
                        else jnp.bool_(True) for leaf in leaves])
    return checksums, finite


def on_host(tree: Any) -> tuple[np.ndarray, np.ndarray]:
    """`on_devices`' values, computed with numpy from each leaf's whole value (arrays this
    process holds whole, or fully replicated)."""
    checksums, finite = [], []
    for leaf in jax.tree.leaves(tree):
        value = leaf if _is_key(leaf) else np.asarray(leaf)
        checksums.append(_checksum(_words(value, np), np))
        finite.append(not jnp.issubdtype(value.dtype, jnp.inexact) or bool(np.isfinite(value).all()))
    return np.array(checksums, np.uint32), np.array(finite, bool)


def leaf_names(tree: Any) -> list[str]:
    """'params.stages.0.0.conv1.kernel' for each leaf, in the order of jax.tree.leaves."""
    return [jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
