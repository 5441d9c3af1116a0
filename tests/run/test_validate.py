"""The config's numbers are checked before anything runs: each bad one refused in one line."""

import json

import pytest
from etils import epath

from configs import default
from resnet_jax.run import validate


@pytest.mark.parametrize("field, value, message", [
    ("schedule.base_lr", float("inf"), "schedule.base_lr must be a positive number; got inf"),
    ("schedule.base_lr", float("nan"), "schedule.base_lr must be a positive number; got nan"),
    ("schedule.warmup_epochs", -5.0, "schedule.warmup_epochs must be a number >= 0; got -5.0"),
    ("schedule.warmup_steps", -1, "schedule.warmup_steps must be an integer >= 0; got -1"),
    ("schedule.boundaries_steps", (32_000, float("inf")), "schedule.boundaries_steps must be numbers"),
    ("train.num_steps", 0, "train.num_steps must be a positive integer, or -1 to train for "
                           "train.num_epochs; got 0"),
    ("train.num_epochs", float("inf"), "train.num_epochs must be a positive number"),
    ("train.num_epochs", -1.0, "train.num_epochs must be a positive number"),
    ("optimizer.weight_decay", float("inf"), "optimizer.weight_decay must be a number >= 0; got inf"),
    ("optimizer.momentum", float("nan"), "optimizer.momentum must be in \\[0, 1\\); got nan"),
    ("optimizer.lars_trust_coefficient", -0.001,
     "optimizer.lars_trust_coefficient must be a positive number; got -0.001"),
    ("optimizer.lars_eps", float("inf"), "optimizer.lars_eps must be a number >= 0; got inf"),
    ("optimizer.lamb_betas", (0.9, 1.0), "optimizer.lamb_betas must be two numbers in \\[0, 1\\); "
                                         "got \\(0.9, 1.0\\)"),
    ("optimizer.lamb_eps", -1e-6, "optimizer.lamb_eps must be a number >= 0; got -1e-06"),
    ("optimizer.lamb_max_grad_norm", float("nan"), "optimizer.lamb_max_grad_norm must be a number >= 0"),
    ("schedule.end_lr", -1e-6, "schedule.end_lr must be a number >= 0; got -1e-06"),
    ("checkpoint.keep", 0, "checkpoint.keep must be a positive integer; got 0"),
])
def test_bad_numbers_are_refused_in_one_line(field, value, message):
    config = default.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(validate.SetupError, match=f"^{message}") as error:
        validate.check_numbers(config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("devices", [1, 2])
def test_bn_groups_of_64_fit_one_or_two_devices_at_batch_128(devices):
    validate.check_bn_groups(64, 128, devices)
    validate.check_bn_groups(None, 128, 8)  # BN over the whole batch: any device count


def test_bn_groups_that_span_devices_are_refused_saying_what_to_set():
    # configs/cifar.py:bn=paper on 8 devices: 16 examples each, groups of 64.
    with pytest.raises(validate.SetupError) as error:
        validate.check_bn_groups(64, 128, 8)
    assert str(error.value) == (
        "model.bn_group_size=64 must divide the per-device batch 16 (train.batch_size 128 on 8 "
        "devices), since each device normalises whole groups of its own: train on a device "
        "count dividing 2 (the batch's groups), set --config.model.bn_group_size to a divisor "
        "of 16, or take BN over the whole batch with the config's argument bn=global "
        "(--config=resnet50:bn=global, --config=cifar:bn=global)")
    with pytest.raises(validate.SetupError, match="^model.bn_group_size must be a positive "
                                                  "integer or unset; got 0$"):
        validate.check_bn_groups(0, 128, 1)


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_trust_ratios_refuse_scanned_stages(optimizer):
    config = default.get_config()
    config.optimizer.name = optimizer
    validate.check_numbers(config)
    config.model.scan_blocks = True
    with pytest.raises(validate.SetupError, match=rf"^model.scan_blocks must be False with "
                                                  rf"optimizer.name='{optimizer}' \(one trust ratio "
                                                  rf"per layer\); got True$"):
        validate.check_numbers(config)


def test_the_defaults_and_a_fixed_step_count_pass():
    config = default.get_config()
    validate.check_numbers(config)
    config.train.num_steps = 10
    config.train.num_epochs = 0.0  # unused when num_steps is set
    validate.check_numbers(config)


def test_a_workdir_of_an_older_config_resumes_and_a_changed_field_is_refused(tmp_path):
    config = default.get_config()
    old = config.to_dict()
    del old["data"]["on_device"]  # a field the older run's version did not have
    (tmp_path / "config.json").write_text(json.dumps(old))
    validate.check_workdir(epath.Path(tmp_path), config.to_json_best_effort(), allow_config_change=False)
    config.model.shortcut = "C"
    with pytest.raises(validate.SetupError, match=r"different config \(model.shortcut: 'B' -> 'C'\)"):
        validate.check_workdir(epath.Path(tmp_path), config.to_json_best_effort(), allow_config_change=False)
