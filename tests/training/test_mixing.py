"""Mixup and CutMix (resnet_jax/training/mixing.py): the ratio's distribution, the pasted box and
the labels' share of it, the switch between them, and their place in the train step."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from configs import default
from resnet_jax.run import jsonl, validate
from resnet_jax.training import loop, mixing
from runs import REPO, environment, small_config

DRAWS = 2000


def _draws(mix: mixing.Mixing, images: np.ndarray, draws: int = DRAWS):
    """(images, lam) of steps 0 .. draws - 1."""
    return jax.jit(jax.vmap(lambda step: mix(jnp.asarray(images), step)))(jnp.arange(draws))


def _labelled(batch: int = 4, size: int = 16) -> np.ndarray:
    """Images whose every pixel is their example's number plus one: a pixel tells its source."""
    return np.broadcast_to(np.arange(1, batch + 1, dtype=np.float32)[:, None, None, None],
                           (batch, size, size, 3)).copy()


def _ks_pvalue(samples: np.ndarray, alpha: float) -> float:
    return stats.kstest(samples, stats.beta(alpha, alpha).cdf).pvalue


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixups_ratio_is_beta_alpha_alpha_and_mixes_images_and_labels_alike(alpha):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
    mixed, lam = _draws(mixing.Mixing(mixup_alpha=alpha), images)
    assert _ks_pvalue(np.asarray(lam), alpha) > 1e-3
    # The test has the power to see a ratio from another distribution: Beta(alpha, 2 alpha), say.
    assert _ks_pvalue(rng.beta(alpha, 2 * alpha, DRAWS), alpha) < 1e-6
    lam = np.asarray(lam)[:, None, None, None, None]
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * np.roll(images, 1, axis=0),
                               rtol=1e-5, atol=1e-6)
    targets = np.eye(3, dtype=np.float32)
    np.testing.assert_allclose(mixing.targets(targets, 0.3), 0.3 * targets + 0.7 * targets[[2, 0, 1]])


def test_cutmix_pastes_a_box_of_the_next_image_and_mixes_labels_by_its_area():
    images = _labelled()
    mixed, lam = _draws(mixing.Mixing(cutmix_alpha=1.0), images)
    mixed, lam = np.asarray(mixed), np.asarray(lam)
    partner = np.roll(np.arange(1, 5), 1)
    for draw in range(DRAWS):
        for i in range(4):
            pasted = mixed[draw, i, :, :, 0] == partner[i]
            kept = mixed[draw, i, :, :, 0] == i + 1
            assert (pasted | kept).all()
            # The label's share is the pasted area after clipping, exactly.
            assert 1 - pasted.mean() == pytest.approx(lam[draw], abs=1e-6)
            rows, columns = np.nonzero(pasted.any(1))[0], np.nonzero(pasted.any(0))[0]
            if rows.size:  # a box: its bounding rectangle is filled
                assert pasted.sum() == rows.size * columns.size
        # One box for the whole batch.
        assert len({tuple(map(tuple, mixed[draw, i, :, :, 0] == partner[i])) for i in range(4)}) == 1


def test_the_cutmix_box_has_sides_of_the_root_of_its_area_and_a_uniform_centre():
    # lam 0.75: a quarter of the area, sides of half the image's: 8 of 16 pixels.
    keys = jax.random.split(jax.random.key(0), 1000)
    boxes = np.asarray(jax.vmap(lambda key: mixing.box((16, 16), jnp.float32(0.75), key))(keys))
    centres = []
    for box in boxes:
        rows, columns = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
        assert box.sum() == rows.size * columns.size and rows.size <= 8 and columns.size <= 8
        # The side, clipped where the box crosses an edge; the centre 4 pixels in from its edge.
        assert rows.size == 8 or rows[0] == 0 or rows[-1] == 15
        centres.append(rows[-1] - 3 if rows[0] == 0 else rows[0] + 4)
    # Every row a centre; whole boxes from centres 4-12 on both axes: (9/16)^2 of them.
    assert set(centres) == set(range(16))
    interior = np.mean([box.sum() == 64 for box in boxes])
    assert abs(interior - (9 / 16) ** 2) < 0.05  # about 3 standard deviations


def test_a_batch_is_mixed_with_mix_prob_by_cutmix_with_switch_prob():
    images = _labelled()
    mixed, lam = _draws(mixing.Mixing(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5, switch_prob=0.3),
                        images)
    mixed, lam = np.asarray(mixed), np.asarray(lam)
    untouched = lam == 1.0
    assert np.array_equal(mixed[untouched], np.broadcast_to(images, mixed[untouched].shape))
    # CutMix leaves every pixel one image's value; mixup blends them.
    whole = np.array([np.isin(m, np.arange(1, 5)).all() for m in mixed])
    cutmix = whole & ~untouched
    assert abs(untouched.mean() - 0.5) < 0.05
    assert abs(cutmix.sum() / (~untouched).sum() - 0.3) < 0.05
    none = mixing.Mixing(mixup_alpha=1.0, prob=0.0)
    unchanged, lam = _draws(none, images, 10)
    assert np.array_equal(unchanged, np.broadcast_to(images, unchanged.shape)) and (lam == 1).all()


def test_the_draws_are_a_function_of_the_seed_and_step():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    mix = mixing.Mixing(mixup_alpha=0.2, cutmix_alpha=1.0, seed=3)
    first, again = mix(images, jnp.int32(7)), mix(images, jnp.int32(7))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other_seed = mixing.Mixing(mixup_alpha=0.2, cutmix_alpha=1.0, seed=4)(images, jnp.int32(7))
    other_step = mix(images, jnp.int32(8))
    assert not np.array_equal(first[0], other_seed[0]) and not np.array_equal(first[0], other_step[0])


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from resnet_jax.distributed import sharding
from resnet_jax.training import mixing
mix = mixing.Mixing(mixup_alpha=0.2, cutmix_alpha=1.0, seed=1)
images = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 3)), jnp.float32)
mesh = sharding.make_mesh()
assert mesh.size == 8
sharded = jax.device_put(images, sharding.batch_sharding(mesh))
for step in range(6):
    one = jax.jit(mix)(images, step)
    eight = jax.jit(mix)(sharded, step)
    assert all(np.array_equal(a, b) for a, b in zip(one, eight)), step
print("same")
"""


@pytest.mark.slow
def test_a_batch_sharded_over_eight_devices_mixes_as_on_one():
    done = subprocess.run([sys.executable, "-c", SHARDED], cwd=REPO, env=environment(devices=8),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["same"], done.stderr[-3000:]


@pytest.mark.parametrize("field, value, words", [
    ("mixup_alpha", -0.2, "train.mixup_alpha must be a number >= 0 (0: off); got -0.2"),
    ("cutmix_alpha", float("nan"), "train.cutmix_alpha must be a number >= 0"),
    ("mix_prob", 1.5, "train.mix_prob must be in [0, 1]; got 1.5"),
    ("mix_switch_prob", -0.1, "train.mix_switch_prob must be in [0, 1]; got -0.1")])
def test_bad_mixing_fields_are_named(field, value, words):
    config = default.get_config()
    config.train[field] = value
    with pytest.raises(ValueError) as info:
        validate.check_numbers(config)
    assert words in str(info.value)


def test_the_default_mixes_nothing():
    assert not mixing.from_config(default.get_config().train, 0).enabled


@pytest.mark.slow
def test_a_run_trains_on_mixed_batches(tmp_path):
    config = small_config(**{"train.mixup_alpha": 0.2, "train.cutmix_alpha": 1.0,
                             "train.label_smoothing": 0.1, "train.num_steps": 3,
                             "eval.every_steps": 3, "checkpoint.every_steps": 3})
    loop.train_and_evaluate(config, str(tmp_path))
    rows = [row for row in jsonl.read_rows(tmp_path) if "train_loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(np.isfinite(row["train_loss"]) for row in rows)
