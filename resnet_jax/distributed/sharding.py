"""Devices and the batch: the mesh, host batches assembled into global arrays, distributed start.

One program serves one CPU and a pod alike: `jax.jit` over a `Mesh` with the batch sharded over
every mesh axis and the train state replicated (docs/design.md). One slice is the flat mesh
("data",); several slices (TPU multislice) are ("replica", "data"): slices across, devices within,
so that XLA reduces over the fast links inside a slice before it crosses between slices. Each
process feeds only its own slice of the global batch; `jax.make_array_from_process_local_data`
stitches the slices together, on the main thread, as every JAX operation of the run.
"""

import collections
import concurrent.futures
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax.distributed.clusters import CLUSTERS, detect_cluster

DATA_AXIS = "data"
REPLICA_AXIS = "replica"
ONE_PROCESS = "one process (no cluster environment found)"

def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> str:
    """Starts jax.distributed where the launch has processes to join; returns what was found.

    Explicit coordinator flags win; otherwise the launch `detect_cluster` finds (a Cloud TPU VM
    of any slice, whose workers JAX reads from the metadata server; SLURM; Open MPI; Cloud TPU
    on GKE; Kubernetes) is joined by `jax.distributed.initialize()`, which reads the
    coordinator, process count and index from it; otherwise one process. Must run before
    anything touches a device.
    """
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return "the --coordinator_address flags"
    cluster = detect_cluster()
    if cluster is None:
        return ONE_PROCESS
    try:
        jax.distributed.initialize()
    except ValueError:
        # Raised before anything starts when JAX finds no launch to join: with libtpu alone
        # that means no Cloud TPU VM's metadata server answered (libtpu installed elsewhere).
        # Any other launch was named by its own variables: its error says what is wrong.
        if cluster != "GceTpuCluster":
            raise
        return ONE_PROCESS
    return CLUSTERS[cluster]


def define_flags() -> None:
    """The flags of a multi-process launch that no cluster environment describes, read by
    `initialize_from_flags`."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process "
                        "runs that no cluster environment (TPU pod, SLURM, MPI) describes.")
    flags.DEFINE_integer("num_processes", None, "Processes in all, with --coordinator_address.")
    flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")


def initialize_from_flags() -> str:
    """`initialize_distributed` with the flags of `define_flags`."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    f = flags.FLAGS
    return initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)


def same_on_every_process(text: str) -> bool:
    """Whether every process passed the same `text` (one small all-gather, main thread)."""
    if jax.process_count() == 1:
        return True
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = multihost_utils.process_allgather(digest)
    return bool((digests == digests[0]).all())


def make_mesh(devices: list[Any] | None = None) -> Mesh:
    """The flat mesh ("data",) of all devices; ("replica", "data") where they lie in several slices."""
    devices = jax.devices() if devices is None else devices
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) == 1:
        return Mesh(np.asarray(devices), (DATA_AXIS,))
    grid = mesh_utils.create_hybrid_device_mesh((1, len(devices) // len(slices)), (len(slices), 1),
                                                devices)
    return Mesh(grid, (REPLICA_AXIS, DATA_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


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


def prefetch(batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, size: int = 2) -> Iterator[dict[str, Any]]:
    """Global batches of `batches`: `size` host batches made ahead on a thread, the next one
    already on its way to the devices while the current step computes.

    The thread only moves host data (tf.data, numpy). The copies to the devices are issued here,
    on the caller's thread: in a multi-process run every JAX operation must be, so that all
    processes issue them in the same order (JAX refuses others under `jax.thread_guard`).
    """
    iterator = iter(batches)
    queue: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for _ in range(size):
            queue.append(pool.submit(next, iterator, None))
        ahead = None
        try:
            while (batch := queue.popleft().result()) is not None:
                queue.append(pool.submit(next, iterator, None))
                batch = to_global(batch, mesh)  # asynchronous copies
                if ahead is not None:
                    yield ahead
                ahead = batch
        except Exception:  # `batches` raised after its last batch (an eval's bad images): the
            if ahead is not None:  # batch made before it is yielded first, as on the others
                yield ahead
            raise
        if ahead is not None:
            yield ahead
