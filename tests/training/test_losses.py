"""The training losses (resnet_jax/training/losses.py) against torch's and timm's own."""

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm import loss as timm_loss

from configs import default
from resnet_jax.run import jsonl, validate
from resnet_jax.training import losses, loop
from runs import small_config

RNG = np.random.default_rng(0)
LOGITS = (RNG.normal(size=(16, 10)) * 3).astype(np.float32)
LABELS = RNG.integers(0, 10, 16)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_is_torchs(smoothing):
    ours = losses.Loss("cross_entropy", smoothing)(LOGITS, LABELS)
    theirs = F.cross_entropy(torch.from_numpy(LOGITS), torch.from_numpy(LABELS),
                             label_smoothing=smoothing, reduction="none")
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("smoothing, threshold",
                         [(0.0, None), (0.1, None), (0.1, 0.2), (0.0, 0.2), (0.0, 0.0)])
def test_binary_cross_entropy_is_timms(smoothing, threshold):
    ours = losses.Loss("binary_cross_entropy", smoothing, threshold)(LOGITS, LABELS)
    theirs = timm_loss.BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold)(
        torch.from_numpy(LOGITS), torch.from_numpy(LABELS))
    # timm's is the batch mean; ours per example, which the train step averages.
    np.testing.assert_allclose(np.mean(ours), theirs.item(), rtol=1e-6)
    one_hot = np.eye(10, dtype=np.float32)[LABELS]
    targets = one_hot * (1 - smoothing) + smoothing / 10
    if threshold is not None:
        targets = (targets > threshold).astype(np.float32)
    per_example = F.binary_cross_entropy_with_logits(torch.from_numpy(LOGITS), torch.from_numpy(targets),
                                                     reduction="none").mean(-1)
    np.testing.assert_allclose(ours, per_example.numpy(), rtol=1e-6, atol=1e-7)


def _train(**fields):
    train = default.get_config().train
    train.update(fields)
    return train


def test_the_default_loss_is_the_papers():
    assert losses.from_config(default.get_config().train) == losses.Loss("cross_entropy", 0.0, None)


@pytest.mark.parametrize("fields, words", [
    ({"loss": "focal"}, "train.loss must be one of 'cross_entropy', 'binary_cross_entropy'; got 'focal'"),
    ({"bce_target_threshold": 0.2},
     "train.bce_target_threshold must be None with train.loss='cross_entropy'"),
    ({"loss": "binary_cross_entropy", "bce_target_threshold": 1.5}, "must be None or in [0, 1)")])
def test_bad_loss_fields_are_named(fields, words):
    config = default.get_config()
    config.train = _train(**fields)
    with pytest.raises(ValueError) as info:  # its numbers checked with the config's, then its choices
        validate.check_numbers(config)
        losses.from_config(config.train)
    assert words in str(info.value)


def test_a_config_takes_the_fields():
    train = ml_collections.ConfigDict(dict(loss="binary_cross_entropy", label_smoothing=0.1,
                                           bce_target_threshold=0.2))
    assert losses.from_config(train) == losses.Loss("binary_cross_entropy", 0.1, 0.2)


@pytest.mark.slow
def test_a_run_trains_with_lamb_and_binary_cross_entropy(tmp_path):
    config = small_config(**{
        "train.loss": "binary_cross_entropy", "train.bce_target_threshold": 0.2,
        "optimizer.name": "lamb", "optimizer.weight_decay_mode": "decoupled",
        "optimizer.weight_decay": 0.01, "optimizer.decay_bn_and_bias": False,
        "schedule.base_lr": 5e-3, "schedule.end_lr": 1e-6, "train.num_steps": 3,
        "eval.every_steps": 3, "checkpoint.every_steps": 3})
    loop.train_and_evaluate(config, str(tmp_path))
    rows = [row for row in jsonl.read_rows(tmp_path) if "train_loss" in row]
    # Binary cross-entropy over 10 classes starts near ln 2, softmax cross-entropy near ln 10.
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(0 < row["train_loss"] < 1.0 for row in rows), rows
