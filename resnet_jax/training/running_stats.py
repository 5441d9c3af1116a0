"""Ghost BN's running statistics kept per device while training, so that the train step needs no
cross-device reduction for them.

With `bn_group_size`, every group lies on one device and normalising needs nothing from the
others (Sec. 3.4: the paper normalised per GPU). Only the running averages would still average
the groups of all devices each step. They need not: the running average is linear in the batch
statistics, so the mean over devices of per-device running averages, all started from the same
value, is exactly the running average of the mean over devices. `spread` gives each BN mean and
variance an axis of the device count before the channels, sharded as the batch, which `BatchNorm`
updates from its device's groups alone; `gather` averages that axis away, once, for evaluation
and for checkpoints, whose layout stays the same.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax.distributed import sharding


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _map_stats(fn, model_state: nnx.State) -> nnx.State:
    """fn applied to the value of each BN statistic (nnx.BatchStat); the other state as it is."""
    return jax.tree.map(lambda v: v.replace(fn(v[...])) if isinstance(v, nnx.BatchStat) else v,
                        model_state, is_leaf=_is_variable)


def _per_device_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    # (..., devices, channels): the device axis over the whole mesh, as the batch is.
    return NamedSharding(mesh, PartitionSpec(*([None] * (ndim - 2)), mesh.axis_names, None))


def spread(model_state: nnx.State, mesh: Mesh) -> nnx.State:
    """Each BN statistic, (..., channels), as one copy per device, (..., devices, channels)."""
    devices = mesh.size
    placement = jax.tree.map(
        lambda v: _per_device_sharding(mesh, v.ndim + 1) if isinstance(v, nnx.BatchStat)
        else sharding.replicated(mesh), model_state, is_leaf=_is_variable)
    copies = functools.partial(_map_stats, lambda s: jnp.broadcast_to(
        s[..., None, :], s.shape[:-1] + (devices, s.shape[-1])))
    return jax.jit(copies, out_shardings=placement)(model_state)


def per_device(model_state: nnx.State) -> nnx.State:
    """The BN statistics of a spread state, (..., devices, channels), as a checkpoint keeps them."""
    return model_state.filter(nnx.BatchStat)


def resume(model_state: nnx.State, saved: dict | None, mesh: Mesh) -> nnx.State:
    """`spread`, with the per-device statistics a checkpoint saved (`per_device`, as the nested
    dicts of `checkpoint.pure`) in place of the copies where they were saved on as many devices
    as `mesh` has: the resumed run continues as if never stopped. Saved on another device count
    (or not saved), the copies of their average, which continue the same running average."""
    spread_stats = spread(model_state, mesh)
    stats = per_device(spread_stats)
    mine = stats.to_pure_dict()
    if saved is None or jax.tree.structure(saved) != jax.tree.structure(mine) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(mine))):
        return spread_stats
    placement = jax.tree.map(lambda leaf: leaf.sharding, spread_stats)
    stats.replace_by_pure_dict(saved)  # new variables: spread_stats keeps its own
    return jax.jit(lambda tree: tree, out_shardings=placement)(nnx.merge_state(spread_stats, stats))


def gather(model_state: nnx.State, mesh: Mesh) -> nnx.State:
    """The per-device statistics averaged over the devices: (..., channels), replicated."""
    return _averager(mesh)(model_state)


@functools.lru_cache(maxsize=None)
def _averager(mesh: Mesh):
    # One jitted function per mesh, so that each evaluation and save reuses its compilation.
    return jax.jit(functools.partial(_map_stats, lambda s: s.mean(-2)),
                   out_shardings=sharding.replicated(mesh))
