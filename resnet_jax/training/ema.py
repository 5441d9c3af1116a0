"""An exponential moving average (EMA) of the weights: the parameters and BN's running
statistics, as torchvision's recipe keeps it (`torchvision.references.classification`'s
ExponentialMovingAverage over `torch.optim.swa_utils.AveragedModel` with its buffers). Not in
the paper.

Every `every_steps` steps, average = decay x average + (1 - decay) x weights; the first update,
and every update within the schedule's warm-up, copies the weights instead (torchvision resets
its average during the warm-up epochs). With `adjust`, torchvision's batch-adjusted decay: the
update's decay is 1 - min(1, (1 - decay) x batch x every_steps / epochs). The average lives in
the train state, so checkpoints keep it and a resumed run continues it; the loop evaluates it
beside the weights themselves (the `ema_eval_*` metrics).
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax


@flax.struct.dataclass
class Average:
    params: Any
    model_state: Any
    # Updates averaged since the last copy; 0: the next update copies.
    updates: jax.Array


@dataclasses.dataclass(frozen=True)
class EMA:
    """A config's average (`from_config`): `init` makes it, `update` moves it after a step."""

    decay: float          # of each update, adjusted where asked
    every_steps: int
    warmup_steps: int     # steps whose updates copy the weights

    def init(self, params: Any, model_state: Any) -> Average:
        return Average(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, model_state),
                       jnp.zeros((), jnp.int32))

    def update(self, average: Average, params: Any, model_state: Any, step: jax.Array) -> Average:
        """`average` after step `step` (from 1) has made `params` and `model_state`."""
        def updated(average: Average) -> Average:
            copy = average.updates == 0

            def mix(kept, new):  # random streams and counters are taken as they are
                if not jnp.issubdtype(new.dtype, jnp.floating):
                    return new
                return jnp.where(copy, new, self.decay * kept + (1 - self.decay) * new).astype(kept.dtype)

            updates = jnp.where(step <= self.warmup_steps, 0, jnp.where(copy, 1, average.updates + 1))
            return Average(jax.tree.map(mix, average.params, params),
                           jax.tree.map(mix, average.model_state, model_state), updates.astype(jnp.int32))

        return lax.cond(step % self.every_steps == 0, updated, lambda average: average, average)


def from_config(train: Any, steps_per_epoch: int, num_steps: int, warmup_steps: int) -> EMA | None:
    """The EMA of `train` (a config's section: ema_decay, ema_every_steps, ema_adjust; checked by
    `validate.check_numbers`), None where ema_decay is 0."""
    decay, every = train.ema_decay, train.ema_every_steps
    if not decay:
        return None
    if train.ema_adjust:
        epochs = num_steps / steps_per_epoch
        decay = 1 - min(1.0, (1 - decay) * train.batch_size * every / epochs)
    return EMA(float(decay), every, warmup_steps)
