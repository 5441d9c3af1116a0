"""Mixup and CutMix: each train batch mixed with itself shifted by one example, inside the
jitted train step, and the labels mixed in the same proportion.

Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"): x = lam x + (1 - lam) x',
lam ~ Beta(mixup_alpha, mixup_alpha). CutMix (Yun et al. 2019, "CutMix: Regularization Strategy
to Train Strong Classifiers with Localizable Features"): a box of x' pasted into x, its sides
sqrt(1 - lam) of the image's about a uniformly drawn centre, clipped at the image's edges; the
labels mixed by the box's area after clipping. One draw per batch, as torchvision's and timm's
recipes draw: the batch is mixed with probability `prob`, by CutMix with probability
`switch_prob` where both are on. The draws are a function of (seed, step) alone: the same on
every process, and a resumed run draws what an uninterrupted one would. Not in the paper.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

_STREAM = 0x6D6978  # this module's draws, apart from the others made of the seed


@dataclasses.dataclass(frozen=True)
class Mixing:
    """A config's mixing (`from_config`); called on a batch's images (B, H, W, C) and the step,
    it returns them mixed and lam, the share of each image's own (`targets` mixes its labels)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, images: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        mixes, kind, ratio, centre = jax.random.split(
            jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), _STREAM), step), 4)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = jax.random.bernoulli(kind, self.switch_prob)
        else:
            cutmix = jnp.asarray(self.cutmix_alpha > 0)
        alpha = jnp.where(cutmix, self.cutmix_alpha, self.mixup_alpha)
        lam = jax.random.beta(ratio, alpha, alpha)
        others = jnp.roll(images, 1, axis=0)
        inside = box(images.shape[1:3], lam, centre)
        cut = jnp.where(inside[None, :, :, None], others, images)
        blended = lam * images + (1 - lam) * others
        lam = jnp.where(cutmix, 1 - inside.mean(), lam)  # the box's area after clipping
        mixed = jax.random.bernoulli(mixes, self.prob)
        lam = jnp.where(mixed, lam, 1.0)
        images = jnp.where(mixed, jnp.where(cutmix, cut, blended), images).astype(images.dtype)
        return images, lam


def targets(own: jax.Array, lam: jax.Array) -> jax.Array:
    """The targets (B, classes) of a batch mixed with share `lam` of its own images."""
    return lam * own + (1 - lam) * jnp.roll(own, 1, axis=0)


def box(shape: tuple[int, int], lam: jax.Array, key: jax.Array) -> jax.Array:
    """CutMix's box as a (H, W) mask: sides int(sqrt(1 - lam) x the image's), whole pixels,
    about a centre drawn uniformly among the pixels, clipped at the edges."""
    height, width = shape
    rows, columns = jax.random.randint(key, (2,), 0, jnp.array([height, width]))
    side = jnp.sqrt(1 - lam)
    half_height = (jnp.floor(side * height) // 2).astype(jnp.int32)
    half_width = (jnp.floor(side * width) // 2).astype(jnp.int32)
    y = jnp.arange(height)[:, None]
    x = jnp.arange(width)[None, :]
    return ((y >= rows - half_height) & (y < rows + half_height)
            & (x >= columns - half_width) & (x < columns + half_width))


def from_config(train: Any, seed: int) -> Mixing:
    """The `Mixing` of `train` (a config's section: mixup_alpha, cutmix_alpha, mix_prob,
    mix_switch_prob; checked by `validate.check_numbers`)."""
    return Mixing(float(train.mixup_alpha), float(train.cutmix_alpha), float(train.mix_prob),
                  float(train.mix_switch_prob), int(seed))
