"""`--help` of every command: usage and exit 0; every config field described by its own comment
in configs/default.py; a config's arguments with their defaults and what they take."""

import argparse
import subprocess
import sys

import pytest

from configs import default
from resnet_jax import layers, models, report
from resnet_jax.cli import config_files, config_help
from resnet_jax.data import preprocess
from resnet_jax.run import validate
from resnet_jax.training import optim
from runs import REPO, environment

# The fields whose values are one of a set the code checks, and that set: the comment of each
# names every value.
CHOICES = {
    "model.shortcut": models.SHORTCUTS, "model.stride_on": models.STRIDE_ON,
    "model.block_order": models.BLOCK_ORDERS, "model.gate": models.GATES,
    "model.block": tuple(models.BLOCKS), "model.init_fan": layers.INIT_FANS,
    "model.conv_weight_grad": layers.CONV_WEIGHT_GRADS,
    "data.train_preprocess": preprocess.TRAIN_PREPROCESS,
    "data.eval_preprocess": preprocess.EVAL_PREPROCESS,
    "data.resize_method": preprocess.RESIZE_METHODS, "data.dtype": tuple(preprocess.DTYPES),
    "optimizer.name": optim.OPTIMIZERS, "optimizer.weight_decay_mode": optim.WEIGHT_DECAY_MODES,
    "schedule.name": optim.SCHEDULES,
}


def _comments():
    with open(config_files.directory() + "/default.py") as f:
        return config_help.comments(f.read())


def test_a_comment_belongs_to_the_field_it_is_written_for():
    source = '''
    config.optimizer = ml_collections.ConfigDict(dict(
        name="sgd",                  # the optimizer,
                                     # continued
        # About the field below,
        # on two lines.
        decay=True,
        # Above, and
        eta=0.001,                   # after.
        plain=1,
    ))
    # About a top field.
    config.top = 3
'''
    assert config_help.comments(source) == {
        "optimizer.name": "the optimizer, continued",
        "optimizer.decay": "About the field below, on two lines.",
        "optimizer.eta": "Above, and after.", "top": "About a top field."}


@pytest.mark.parametrize("name", config_files.shipped())
def test_every_field_of_every_shipped_config_has_a_comment_naming_its_value(name):
    namespace = {}
    exec(compile(open(config_files.resolve(name)).read(), name, "exec"), namespace)  # noqa: S102
    comments = _comments()
    for field, value in validate.dotted(namespace["get_config"]().to_dict()).items():
        assert comments.get(field), f"{field} has no comment in configs/default.py"
        if field in CHOICES and value is not None:
            assert f'"{value}"' in comments[field], (name, field, value, comments[field])


@pytest.mark.parametrize("field", sorted(CHOICES))
def test_a_choice_field_names_every_value_it_takes(field):
    comment = _comments()[field]
    assert all(f'"{value}"' in comment for value in CHOICES[field]), (field, comment)


def test_every_argument_of_a_config_is_described_with_its_default():
    for name in config_files.shipped():
        namespace = {}
        exec(compile(open(config_files.resolve(name)).read(), name, "exec"), namespace)  # noqa: S102
        for key, (value, about) in namespace.get("ARGUMENTS", {}).items():
            assert isinstance(value, str) and about, (name, key)
            namespace["get_config"](f"{key}={value}")  # the default is a value it takes
    assert default.IMAGENET_ARGUMENTS["bn"][0] == "paper"


def _help(*command):
    return subprocess.run([sys.executable, "-m", *command, "--help"], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=120)


def test_main_help_without_a_config_says_whose_values_it_shows():
    done = _help("resnet_jax.main")
    assert done.returncode == 0, done.stderr
    assert "quickstart.py (the quickstart: no --config given)" in done.stdout, done.stdout[:3000]
    lines = done.stdout.splitlines()
    assert any(line.startswith("--config: ") for line in lines), done.stdout[:3000]
    assert any(line.startswith("--verbosity: ") for line in lines), done.stdout[:3000]
    configs = next(line for line in lines if line.startswith("Shipped configs"))
    sweeps = next(line for line in lines if line.startswith("Shipped sweeps"))
    assert "quickstart" in configs and "sweep_fig6" in sweeps and "sweep_" not in configs


def test_main_help_lists_a_configs_arguments():
    done = _help("resnet_jax.main", "--config=cifar")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("  depth=20 ") and "6n+2" in line for line in lines), done.stdout
    assert any(line.startswith("  bn=global ") and '"paper"' in line for line in lines)
    shortcut = next(line for line in lines if line.startswith("  shortcut = 'A'"))
    assert '"A" zero-padded identity' in shortcut, shortcut


@pytest.mark.slow
@pytest.mark.parametrize("command", [("resnet_jax.evaluate",), ("resnet_jax.report",),
                                     ("launch.sweep",), ("launch.tpu_pod",)])
def test_every_command_prints_its_usage_and_exits_0(command):
    done = _help(*command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower() or "--workdir" in done.stdout, done.stdout[:2000]
    assert "resnet_jax: error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    # Nor TensorFlow's native start-up notices (`console.import_tensorflow`).
    assert "InitializeLog" not in done.stderr and "oneDNN" not in done.stderr, done.stderr


def test_every_argument_of_report_says_what_it_takes():
    commands = next(action for action in report._parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        for action in parser._actions:
            assert action.help, (name, action.dest)  # a new user's trial met bare names
