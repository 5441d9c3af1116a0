"""Which launch started this process, read from the launchers' own environment variables: no JAX
import (the supervisor of a multi-process run asks before JAX starts, `supervisor.py`) and no
private JAX module (a JAX upgrade cannot break start-up)."""

import importlib.util
import os

# The launches `jax.distributed.initialize()` joins by itself, by the names JAX's own log gives
# them (its cluster classes), and as our log describes them.
CLUSTERS = {"OmpiCluster": "Open MPI", "SlurmCluster": "SLURM", "GceTpuCluster": "Cloud TPU VM",
            "GkeTpuCluster": "Cloud TPU on GKE", "K8sCluster": "Kubernetes"}
# The environment variables each launcher sets that JAX reads: mpirun/mpiexec of Open MPI; an
# srun step (the batch script itself, without srun, has no step).
_OPEN_MPI = ("OMPI_MCA_orte_hnp_uri",)
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_GKE_TPU = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")  # either; GKE sets them on TPU pods


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def detect_cluster() -> str | None:
    """The launch that `jax.distributed.initialize()` with no arguments would join, read from
    the launchers' own environment variables through public means only (a JAX upgrade cannot
    break it): "OmpiCluster", "SlurmCluster", "GkeTpuCluster", "K8sCluster" (only with the
    `kubernetes` package, as JAX needs), "GceTpuCluster" where libtpu is installed and nothing
    else is found (a Cloud TPU VM, or not: only its metadata server, which JAX asks, can
    tell), or None: no launch, one process."""
    env = os.environ
    if all(name in env for name in _OPEN_MPI):
        return "OmpiCluster"
    if all(name in env for name in _SLURM):
        return "SlurmCluster"
    tpu = _installed("libtpu")  # JAX looks for TPU launches only where libtpu is installed
    if tpu and any(name in env for name in _GKE_TPU):
        return "GkeTpuCluster"
    if "KUBERNETES_SERVICE_HOST" in env and _installed("kubernetes"):
        return "K8sCluster"
    return "GceTpuCluster" if tpu else None
