"""Shared test setup.

torch and torchvision are imported before anything imports TensorFlow: the other order crashes
torchvision on this platform. Matrix products run at full float32 precision so that equivalence
tests compare the networks, not the backends' fast paths. XLA's CPU fusion is set as the main
job sets it (`resnet_jax.cpu`).
"""

import torch  # noqa: F401  (import order, see above)
import torchvision  # noqa: F401

from resnet_jax import cpu

cpu.set_cpu_fusion()  # the tests compile as the main job does

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
