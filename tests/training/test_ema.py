"""The moving average of the weights (resnet_jax/training/ema.py) against torch's AveragedModel,
torchvision's batch-adjusted decay, and in a run: evaluated, saved and resumed bit-exactly."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim import swa_utils

from configs import default
from resnet_jax.data import pipeline
from resnet_jax.run import checkpoint, jsonl, validate
from resnet_jax.training import ema, evaluation, loop, preemption
from runs import assert_trees_close, rows_without_speed, small_config


def _torch_model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _ours(model):
    """The model's weights as the train state splits them: parameters, and the rest."""
    values = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
    params = {"kernel": values["0.weight"], "bias": values["0.bias"], "scale": values["1.weight"],
              "offset": values["1.bias"]}
    rest = {"mean": values["1.running_mean"], "var": values["1.running_var"],
            "count": values["1.num_batches_tracked"].astype(np.int32)}
    return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, rest)


def test_the_average_of_parameters_and_bn_statistics_is_torchs():
    torch.manual_seed(0)
    model = _torch_model()
    decay = 0.9
    theirs = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(decay),
                                     use_buffers=True)
    average = ema.EMA(decay, every_steps=1, warmup_steps=0)
    state = average.init(*_ours(model))
    for step in range(1, 8):
        model.train()
        model(torch.randn(8, 3)).sum().backward()  # moves BN's running statistics
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        theirs.update_parameters(model)
        state = average.update(state, *_ours(model), jnp.int32(step))
    expected = {name: value.detach().numpy() for name, value in theirs.module.state_dict().items()}
    np.testing.assert_allclose(state.params["kernel"], expected["0.weight"], rtol=1e-6)
    np.testing.assert_allclose(state.params["offset"], expected["1.bias"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.model_state["mean"], expected["1.running_mean"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.model_state["var"], expected["1.running_var"], rtol=1e-6)
    assert int(state.model_state["count"]) == 7  # a counter is taken as it is, not averaged


def test_updates_come_every_k_steps_and_copy_during_the_warm_up():
    average = ema.EMA(0.5, every_steps=2, warmup_steps=4)
    state = average.init({"w": jnp.zeros(())}, {})
    seen = []
    for step in range(1, 9):
        state = average.update(state, {"w": jnp.float32(step)}, {}, jnp.int32(step))
        seen.append(float(state.params["w"]))
    # Steps 2 and 4 copy (warm-up), step 6 copies (the first update after it), step 8 averages.
    assert seen == [0, 2, 2, 4, 4, 6, 6, 0.5 * 6 + 0.5 * 8]


def _train(**fields):
    train = default.get_config().train
    train.update(fields)
    return train


def test_torchvisions_batch_adjusted_decay():
    # torchvision's references/classification/train.py, its recipe's values: 8 GPUs of 128,
    # every 32 steps, 600 epochs, decay 0.99998.
    world_size, batch_size, steps, epochs, decay = 8, 128, 32, 600, 0.99998
    alpha = min(1.0, (1.0 - decay) * (world_size * batch_size * steps / epochs))
    train = _train(batch_size=world_size * batch_size, ema_decay=decay, ema_every_steps=steps,
                   ema_adjust=True)
    assert ema.from_config(train, steps_per_epoch=1251, num_steps=1251 * epochs,
                           warmup_steps=0).decay == pytest.approx(1.0 - alpha, rel=1e-12)
    assert ema.from_config(_train(ema_decay=decay), 1, 1, 0).decay == decay
    assert ema.from_config(default.get_config().train, 1, 1, 0) is None


@pytest.mark.parametrize("field, value, words", [
    ("ema_decay", 1.0, "train.ema_decay must be in [0, 1)"),
    ("ema_every_steps", 0, "train.ema_every_steps must be a positive integer; got 0"),
    ("ema_adjust", 1, "train.ema_adjust must be True or False; got 1")])
def test_bad_fields_are_named(field, value, words):
    config = default.get_config()
    with config.ignore_type():
        config.train[field] = value
    with pytest.raises(ValueError) as info:
        validate.check_numbers(config)
    assert words in str(info.value)


# No warm-up (the quickstart's epoch of it would make every update a copy): updates at steps 2
# (a copy), 4 and 6.
EMA_RUN = {"train.ema_decay": 0.9, "train.ema_every_steps": 2, "schedule.warmup_epochs": 0.0,
           "log_every_steps": 3, "eval.every_steps": 6}


@pytest.mark.slow
def test_a_run_evaluates_the_average_and_resumes_it_bit_exactly(tmp_path, monkeypatch):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    loop.train_and_evaluate(small_config(**EMA_RUN), whole)
    rows = [row for row in jsonl.read_rows(whole) if "eval_accuracy" in row]
    assert [row["step"] for row in rows] == [6]
    assert {"ema_eval_accuracy", "ema_eval_loss"} <= set(rows[0])
    assert rows[0]["ema_eval_loss"] != rows[0]["eval_loss"]
    # The evaluate command's reading of the checkpoint: the average's scores as the run's.
    for average, prefix in ((True, "ema_"), (False, "")):
        step, scores = evaluation.evaluate_saved(small_config(**EMA_RUN), whole, "latest",
                                                 average=average)
        assert step == 6 and all(scores[name] == rows[0][prefix + name] for name in scores), scores

    real_iterator = pipeline.train_iterator

    def preempted_iterator(*args, **kwargs):  # SIGTERM as step 3's batch is made
        for index, batch in enumerate(real_iterator(*args, **kwargs), kwargs["start_step"] + 1):
            if index == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(pipeline, "train_iterator", preempted_iterator)
    with pytest.raises(preemption.Preempted):
        loop.train_and_evaluate(small_config(**EMA_RUN), parts)
    monkeypatch.setattr(pipeline, "train_iterator", real_iterator)
    loop.train_and_evaluate(small_config(**EMA_RUN), parts)
    assert rows_without_speed(parts) == rows_without_speed(whole)
    resumed, uninterrupted = (checkpoint.read_latest(path)[1] for path in (parts, whole))
    assert_trees_close(resumed["ema"], uninterrupted["ema"], rtol=0, atol=0)
    assert_trees_close(resumed["params"], uninterrupted["params"], rtol=0, atol=0)


@pytest.mark.slow
def test_evaluating_the_average_of_a_run_that_kept_none_is_refused(finished_run):
    with pytest.raises(ValueError, match="^--average: the checkpoint of step 6 holds no moving "
                                         "average of the weights"):
        evaluation.evaluate_saved(small_config(), str(finished_run), "latest", average=True)
