"""The main job end to end: quickstart accuracy, devices, processes, checkpoints and restarts."""

import os
import signal

import pytest

from resnet_jax.data import pipeline
from resnet_jax.run import checkpoint, jsonl
from resnet_jax.training import loop, preemption
from runs import assert_trees_close, latest_params, rows_without_speed, run_main, small_config


@pytest.mark.slow
def test_quickstart_short_form_learns_the_digits(tmp_path):
    config = small_config(**{"model.name": "cifar_resnet14", "train.num_steps": 150,
                             "eval.every_steps": 150, "checkpoint.every_steps": 150,
                             "log_every_steps": 50})
    loop.train_and_evaluate(config, str(tmp_path))
    rows = jsonl.read_rows(str(tmp_path))
    final = rows[-1]
    assert final["step"] == 150
    assert final["eval_accuracy"] >= 0.9, final
    assert {"train_loss", "train_accuracy", "learning_rate", "images_per_second", "eval_loss",
            "eval_accuracy", "eval_top5_accuracy"} <= set(final)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert (tmp_path / "config.json").exists()
    assert latest_params(str(tmp_path))[0] == 150


@pytest.mark.slow
def test_preempted_run_resumes_as_if_never_stopped(tmp_path, monkeypatch):
    # Log lines every 4 steps: the window open at the preemption must be carried over.
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    loop.train_and_evaluate(small_config(log_every_steps=4), whole)

    # SIGTERM arrives while the batch of step 3 is made (ahead of time, by the prefetch): the run
    # saves the step it is at, 1, 2 or 3, inside the first log window, and stops.
    real_iterator = pipeline.train_iterator

    def preempted_iterator(*args, **kwargs):
        for index, batch in enumerate(real_iterator(*args, **kwargs), kwargs["start_step"] + 1):
            if index == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(pipeline, "train_iterator", preempted_iterator)
    with pytest.raises(preemption.Preempted) as stopped:
        loop.train_and_evaluate(small_config(log_every_steps=4), parts)
    assert stopped.value.status == preemption.PREEMPTED_STATUS == 75
    assert 0 < latest_params(parts)[0] == stopped.value.step < 4
    monkeypatch.setattr(pipeline, "train_iterator", real_iterator)
    loop.train_and_evaluate(small_config(log_every_steps=4), parts)

    assert rows_without_speed(parts) == rows_without_speed(whole)
    assert_trees_close(latest_params(parts)[1], latest_params(whole)[1], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("group", [None, 4])
def test_eight_devices_train_like_one(tmp_path, group, request):
    # With ghost BN (groups of the 4 examples per device) the running statistics are kept
    # per device on eight and averaged for the checkpoint: they must equal one device's.
    options = {} if group is None else {"model.bn_group_size": group}
    if group is None:  # runs.SMALL on one device: the shared run
        one = request.getfixturevalue("finished_run")
    else:
        one = tmp_path / "one"
        run_main(one, **options)
    run_main(tmp_path / "eight", devices=8, **options)
    eight, one = (checkpoint.read_latest(str(path))[1] for path in (tmp_path / "eight", one))
    # Within float32 rounding of sums taken in another order, grown over 6 steps. With global
    # BN's one-pass statistics (layers.py) two runs differed by up to 1.6e-5 and 7.4e-5 (a
    # stage-3 kernel of 0.024, on 2x2 maps); with two-pass statistics below 1e-5.
    for part in ("params", "model_state"):
        assert_trees_close(eight[part], one[part], rtol=1e-4, atol=1e-5 if group else 2e-4)
    if group is not None:  # the averaged statistics restore into per-device ones and train on
        result = run_main(tmp_path / "eight", "--allow_config_change", devices=8,
                          **options, **{"train.num_steps": 9})
        assert "Restored the checkpoint of step 6" in result.stderr
        assert latest_params(tmp_path / "eight")[0] == 9


def test_a_first_ctrl_c_asks_for_a_save_and_a_second_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption.os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup
    stop = preemption.Preemption()
    try:
        assert not stop.reached(None, 1)
        signal.raise_signal(signal.SIGINT)
        assert stop.reached(None, 1) and stop.exit_status() == 130 and exits == []
        signal.raise_signal(signal.SIGINT)
        assert exits == [130]
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_fresh_run_saves_at_the_interval_only_not_at_step_one(tmp_path):
    # orbax's own policy saves the first step of a fresh run: on a pod the whole state written
    # to the bucket before any real work.
    loop.train_and_evaluate(small_config(**{"checkpoint.keep": 10}), str(tmp_path))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]


def test_a_bug_in_the_setup_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    # validate.SetupError means the user's input: one line, exit 2. A programming error in the
    # code keeps its type and traceback.
    def broken(config):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(loop, "_check_config", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        loop.setup(small_config(), str(tmp_path / "run"))
