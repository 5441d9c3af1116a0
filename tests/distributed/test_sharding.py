"""The mesh, the batch's placement and the distributed start-up, without a pod: stand-in devices
for multislice, the environment for the cluster detection."""

import dataclasses

import jax
import numpy as np
import pytest

from resnet_jax.distributed import sharding
from resnet_jax.training import running_stats
from runs import without_launch_environment


@dataclasses.dataclass(frozen=True)
class StandIn:
    """What the mesh builder reads of a device: its id, process, slice and kind."""
    id: int
    process_index: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "stand-in"


def stand_ins(slices, per_slice, shuffle=True):
    devices = [StandIn(s * per_slice + d, s, s) for s in range(slices) for d in range(per_slice)]
    if shuffle:  # jax.devices() need not list them slice by slice
        devices = [devices[i] for i in np.random.default_rng(0).permutation(len(devices))]
    return devices


def test_several_slices_make_a_replica_by_data_mesh_with_each_slice_in_one_row():
    mesh = sharding.make_mesh(stand_ins(slices=4, per_slice=8))
    assert mesh.axis_names == (sharding.REPLICA_AXIS, sharding.DATA_AXIS)
    assert mesh.devices.shape == (4, 8)
    for row, devices in enumerate(mesh.devices):
        assert {d.slice_index for d in devices} == {row}  # the data axis stays inside a slice
    # The batch is split over both axes: each slice gets a contiguous part of it.
    assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(mesh.axis_names)


def test_one_slice_is_the_flat_data_mesh():
    devices = stand_ins(slices=1, per_slice=8, shuffle=False)
    mesh = sharding.make_mesh(devices)
    assert mesh.axis_names == (sharding.DATA_AXIS,)
    assert list(mesh.devices) == devices
    assert sharding.make_mesh().axis_names == (sharding.DATA_AXIS,)  # this machine's devices


def test_per_device_running_statistics_follow_the_whole_mesh():
    mesh = sharding.make_mesh()
    placement = running_stats._per_device_sharding(mesh, 3)
    assert placement.spec == jax.sharding.PartitionSpec(None, mesh.axis_names, None)


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


@pytest.fixture
def bare_environment(monkeypatch):
    return without_launch_environment(monkeypatch)


def test_cluster_detection_is_jax_own(bare_environment):
    assert sharding.detect_cluster() is None
    for name, value in SLURM.items():
        bare_environment.setenv(name, value)
    assert sharding.detect_cluster() == "SlurmCluster"


def test_no_cluster_means_one_process_without_distributed_start(bare_environment):
    started = []
    bare_environment.setattr(jax.distributed, "initialize", lambda *a, **k: started.append((a, k)))
    assert sharding.initialize_distributed() == sharding.ONE_PROCESS
    assert started == []
    for name, value in SLURM.items():
        bare_environment.setenv(name, value)
    assert sharding.initialize_distributed() == "SLURM"
    assert started == [((), {})]  # JAX reads SLURM's environment itself
    assert sharding.initialize_distributed("host:1234", 2, 1) == "the --coordinator_address flags"
    assert started[-1] == (("host:1234", 2, 1), {})


def test_one_process_is_the_same_as_itself():
    assert sharding.same_on_every_process("anything")


def test_prefetch_yields_every_batch_made_before_its_source_raised():
    # An eval pass raises after its last batch (bad images); every process must still run that
    # batch's step, or the others wait for it in their last collective.
    def batches():
        for i in range(3):
            yield {"image": np.full((jax.device_count(), 2), i, np.float32)}
        raise ValueError("raised after the last batch")

    seen = []
    with pytest.raises(ValueError, match="after the last batch"):
        for batch in sharding.prefetch(batches(), sharding.make_mesh()):
            seen.append(float(batch["image"][0, 0]))
    assert seen == [0.0, 1.0, 2.0]
