"""Shared test setup.

torch and torchvision are imported before anything imports TensorFlow: the other order crashes
torchvision on this platform. Matrix products run at full float32 precision so that equivalence
tests compare the networks, not the backends' fast paths.
"""

import torch  # noqa: F401  (import order, see above)
import torchvision  # noqa: F401

import jax

jax.config.update("jax_default_matmul_precision", "highest")
