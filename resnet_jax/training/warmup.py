"""He et al. 2015's warm-up of Sec. 4.2, `schedule.warmup_until_error`: "we use 0.01 to warm up
the training until the training error is below 80% (about 400 iterations), and then go back to
0.1". The rate in use is `optim.rate_in_use`, inside the step; this object decides when the
warm-up ends, at a log window, alike on every process."""

import jax
import jax.numpy as jnp
import optax
from absl import logging

from resnet_jax.training import steps


class UntilError:
    """Ends the warm-up at the first log window whose training error is below `threshold` (0: no
    such warm-up). The switch is `TrainState.warmed_up`, checkpointed with the state, so that a
    resumed run keeps the rate it had; `over` is the host's copy, read at each window while False."""

    def __init__(self, threshold: float, schedule: optax.Schedule, over: bool):
        self.threshold, self._schedule, self.over = threshold, schedule, over

    def after_window(self, state: steps.TrainState, step: int, train_accuracy: float,
                     replicated) -> steps.TrainState:
        """`state` with the warm-up ended where this window's error is below the threshold. The
        window's metrics are the same on every process, and so is this test; the next step takes
        the schedule's rate."""
        error = 1 - train_accuracy
        if self.over or error >= self.threshold:
            return state
        self.over = True
        logging.info("Warm-up over at step %d: training error %.4f below "
                     "schedule.warmup_until_error=%g; learning rate now %g", step, error,
                     self.threshold, float(self._schedule(step)))
        return state.replace(warmed_up=jax.device_put(jnp.asarray(True), replicated))
