"""The training loss (`train.loss`), per example, in float32.

"cross_entropy" (the paper): softmax cross-entropy. "binary_cross_entropy" (Wightman et al. 2021,
"ResNet strikes back: An improved training procedure in timm"; timm's `BinaryCrossEntropy`):
each class a sigmoid of its own, the binary cross-entropy averaged over the classes; with
`target_threshold` (their recipes': 0.2), a target above it becomes 1 and the rest 0. Either
takes label smoothing (Szegedy et al. 2016): the target is (1 - s) one-hot + s / classes.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

LOSSES = ("cross_entropy", "binary_cross_entropy")


@dataclasses.dataclass(frozen=True)
class Loss:
    """The loss of a config's `train` section (`from_config`): called on (logits, labels), it
    gives each example's loss; `of_targets` on targets made by `targets` (and mixed)."""

    name: str = "cross_entropy"
    label_smoothing: float = 0.0
    target_threshold: float | None = None

    def __call__(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return self.of_targets(logits, self.targets(labels, logits.shape[-1]))

    def targets(self, labels: jax.Array, num_classes: int) -> jax.Array:
        """(B, classes): each label one-hot, smoothed."""
        return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), self.label_smoothing)

    def of_targets(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32)
        if self.name == "cross_entropy":
            return optax.softmax_cross_entropy(logits, targets)
        if self.target_threshold is not None:
            targets = (targets > self.target_threshold).astype(jnp.float32)
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)


def from_config(train: Any) -> Loss:
    """The `Loss` of `train` (a config's section: loss, label_smoothing, bce_target_threshold),
    its choices checked (its numbers: `validate.check_numbers`)."""
    name, threshold = train.loss, train.bce_target_threshold
    if name not in LOSSES:
        raise ValueError(f"train.loss must be one of {', '.join(map(repr, LOSSES))}; got {name!r}")
    if threshold is not None and name != "binary_cross_entropy":
        raise ValueError(f"train.bce_target_threshold must be None with train.loss={name!r} "
                         f"(it binarises binary_cross_entropy's targets); got {threshold!r}")
    return Loss(name, train.label_smoothing, threshold)
