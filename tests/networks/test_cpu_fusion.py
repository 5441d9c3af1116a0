"""The main job's XLA flag: set without overriding the user's, and it stops XLA's CPU backend from
recomputing the residual stream in every fusion."""

import os
import subprocess
import sys

import pytest

from resnet_jax import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def test_the_flag_is_added_and_the_users_own_stand():
    environ = {}
    cpu.set_cpu_fusion(environ)
    assert environ["XLA_FLAGS"] == cpu.CPU_FUSION
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cpu.set_cpu_fusion(environ)
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", cpu.CPU_FUSION]
    mine = {"XLA_FLAGS": "--xla_backend_extra_options=xla_cpu_disable_slp_vectorizer"}
    cpu.set_cpu_fusion(mine)
    assert mine["XLA_FLAGS"] == "--xla_backend_extra_options=xla_cpu_disable_slp_vectorizer"


# The compiled gradient of CIFAR ResNet-20: how many ReLUs (maximum of a batch of maps, not BN's
# clamp of a variance) it computes.
_COUNT_RELUS = """
import re
import jax, jax.numpy as jnp
from flax import nnx
from resnet_jax import models
model = models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(0))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
x = jnp.ones((4, 8, 8, 3))
grad = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest, copy=True)(x).sum()))
print(len(re.findall(r"= f32\\[(1,)?4,\\d+,\\d+,\\d+\\]\\S* maximum\\(", grad.lower(params).compile().as_text())))
"""


def relus_computed(xla_flags_value: str) -> int:
    env = {**os.environ, "XLA_FLAGS": xla_flags_value, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _COUNT_RELUS], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


@pytest.mark.slow
def test_each_relu_is_computed_once():
    # 19 ReLUs: the stem's and two in each of the nine blocks.
    assert relus_computed(cpu.CPU_FUSION) == 19
    # XLA's default recomputes the residual stream in the fusions that read it.
    assert relus_computed("") > 19
