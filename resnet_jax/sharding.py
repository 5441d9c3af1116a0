"""Devices and the batch: one mesh axis "data", host batches assembled into global arrays.

One program serves one CPU and a pod alike: `jax.jit` over a `Mesh` with the batch sharded on
"data" and the train state replicated (DESIGN.md). Each process feeds only its own slice of the
global batch; `jax.make_array_from_process_local_data` stitches the slices together.
"""

import collections
import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax import preprocess

DATA_AXIS = "data"


def _several_processes_launched() -> bool:
    """A SLURM, Open MPI or Cloud TPU pod launch of more than one process (jax reads them itself)."""
    return (int(os.environ.get("SLURM_NTASKS", "1")) > 1
            or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts jax.distributed where the run has several processes; a no-op for one.

    Explicit coordinator flags win; otherwise a Cloud TPU pod slice, SLURM or Open MPI launch is
    detected from its environment. Must run before anything touches a device.
    """
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    if _several_processes_launched():
        jax.distributed.initialize()


def make_mesh() -> Mesh:
    """All devices of all processes on the one axis "data"."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def per_process_batch(global_batch: int, field: str = "batch_size") -> int:
    """The slice of `global_batch` each process reads; it must split evenly over processes and devices."""
    processes, devices = jax.process_count(), jax.device_count()
    if global_batch < 1 or global_batch % devices or global_batch % processes:
        raise ValueError(f"{field} must be a positive multiple of the device count {devices} "
                         f"(and of the process count {processes}); got {global_batch}")
    return global_batch // processes


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch -> global arrays sharded over "data"."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def normaliser(data_config) -> Callable[[dict], dict] | None:
    """For `data.dtype="uint8"`: batch -> batch, on the devices, that turns the pixels into float32
    images normalised as the host pipeline would have (the PCA lighting offset added first);
    None for the other dtypes, whose images arrive normalised."""
    s = preprocess.settings(data_config)
    return _normalise_pixels(s.mean, s.std) if s.on_device else None


@functools.lru_cache(maxsize=None)
def _normalise_pixels(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[dict], dict]:
    # One jitted function per (mean, std), so that every evaluation reuses its compilation.
    mean, scale = np.float32(mean), np.float32(1.0) / np.float32(std)

    @jax.jit
    def normalise(batch):
        batch = dict(batch)
        image = batch["image"].astype(jnp.float32)
        lighting = batch.pop("lighting", None)
        if lighting is not None:
            image = image + lighting[:, None, None, :]
        batch["image"] = (image - mean) * scale
        return batch

    return normalise


def prefetch(batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, size: int = 2,
             finish: Callable[[dict], dict] | None = None) -> Iterator[dict[str, Any]]:
    """Global batches, `size` of them made ahead on a thread so that the devices never wait;
    `finish` (e.g. `normaliser`) runs on each global batch.

    The host-to-device copies run while the current step computes.
    """
    iterator = iter(batches)
    queue: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        def fetch():
            batch = next(iterator, None)
            if batch is None:
                return None
            batch = to_global(batch, mesh)
            return batch if finish is None else finish(batch)

        for _ in range(size):
            queue.append(pool.submit(fetch))
        while True:
            batch = queue.popleft().result()
            if batch is None:
                return
            queue.append(pool.submit(fetch))
            yield batch
