"""What the devices do to a batch before the network sees it, traced inside the jitted steps.

With `data.dtype="uint8"` the host sends rounded pixels (a quarter of the bytes) and the steps
turn them into float32 images normalised as the host pipeline would have, the PCA lighting
offset added first. Inside the step, not in a jitted function of its own: on a pod every JAX
operation is issued from the main thread, in one order on every process, and a separate program
would be one more to keep in order.
"""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from resnet_jax.data import preprocess


def normaliser(data_config) -> Callable[[dict], dict]:
    """batch -> batch: uint8 pixels normalised; other dtypes arrive normalised and pass unchanged."""
    s = preprocess.settings(data_config)
    if not s.on_device:
        return lambda batch: batch
    mean, scale = np.float32(s.mean), np.float32(1.0) / np.float32(s.std)

    def normalise(batch: dict) -> dict:
        batch = dict(batch)
        image = batch["image"].astype(jnp.float32)
        lighting = batch.pop("lighting", None)
        if lighting is not None:
            image = image + lighting[:, None, None, :]
        batch["image"] = (image - mean) * scale
        return batch

    return normalise
