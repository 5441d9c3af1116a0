"""The parametrised configs' arguments: good ones set the fields, bad ones stop with one line."""

import runpy

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import (cifar, plain18, plain34, preact_cifar, resnet18, resnet34, resnet50, resnet101, resnet152,
                     resnet200, vgg)
from resnet_jax import models
from resnet_jax.cli import config_files
from resnet_jax.data import preprocess
from resnet_jax.training import steps
from runs import REPO

IMAGENET = [resnet18, resnet34, resnet50, resnet101, resnet152, resnet200, plain18, plain34]


def test_arguments_set_the_network():
    assert cifar.get_config("depth=56,plain=True").model.name == "cifar_plain56"
    assert cifar.get_config("val=True").data.eval_split == "train[45000:]"
    assert vgg.get_config("depth=19,bn=True").model.name == "vgg19_bn"
    config = preact_cifar.get_config("depth=110")
    assert (config.model.name, config.model.block_order) == ("cifar_resnet110", "pre")


def test_bn_paper_normalises_groups_of_64_as_the_two_gpus_did():
    # Sec. 4.2: batch 128 on two GPUs, Caffe's BN over each GPU's 64. The default: the batch.
    assert cifar.get_config().model.bn_group_size is None
    assert cifar.get_config("bn=global").model.bn_group_size is None
    paper = cifar.get_config("depth=110,bn=paper")
    assert (paper.model.bn_group_size, paper.train.batch_size) == (64, 128)
    assert preact_cifar.get_config("depth=164,bn=paper").model.bn_group_size == 64
    assert preact_cifar.get_config("depth=164").model.bn_group_size is None


@pytest.mark.parametrize("module, arg, message", [
    (cifar, "plain=true", "configs/cifar.py: plain must be True or False; got 'true'"),
    (cifar, "depth=abc", "configs/cifar.py: depth must be an integer; got 'abc'"),
    (cifar, "width=3", "configs/cifar.py takes depth, plain, shortcut, val, bn; got 'width'"),
    (cifar, "bn=ghost", "configs/cifar.py: bn must be one of global, paper; got 'ghost'"),
    (preact_cifar, "bn=64", "configs/preact_cifar.py: bn must be one of global, paper; got '64'"),
    (vgg, "bn=yes", "configs/vgg.py: bn must be True or False; got 'yes'"),
    (preact_cifar, "val=1", "configs/preact_cifar.py: val must be True or False; got '1'"),
    (preact_cifar, "depth=56", "configs/preact_cifar.py: depth must be one of 110, 164, 1001; got 56"),
])
def test_bad_arguments_name_the_field(module, arg, message):
    with pytest.raises(ValueError) as error:
        module.get_config(arg)
    assert str(error.value) == message


@pytest.mark.slow
def test_resnet200_is_the_pre_activation_network():
    """He et al. 2016: full pre-activation bottleneck units, the extra BN-ReLU after the last."""
    config = resnet200.get_config()
    model = nnx.eval_shape(lambda: steps.create_model(config, 1000))  # shapes only: cheap
    blocks = models.blocks(model)
    assert [len(stage) for stage in model.stages] == [3, 24, 36, 3]
    assert {type(info.block).__name__ for info in blocks} == {"BottleneckBlock"}
    assert {info.block.order for info in blocks} == {"pre"}
    assert model.bn_final is not None and config.model.shortcut == "B"


@pytest.mark.parametrize("module", IMAGENET, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_imagenet_configs_normalise_bn_per_32_examples(module):
    # Sec. 3.4's batch of 256 on eight GPUs, Caffe's BN per GPU: 32 examples each.
    assert module.get_config().model.bn_group_size == 32
    assert module.get_config("bn=paper").model.bn_group_size == 32
    assert module.get_config().train.batch_size == 256
    assert module.get_config("bn=global").model.bn_group_size is None  # the whole batch


@pytest.mark.parametrize("module", IMAGENET, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_imagenet_bn_argument_is_checked(module):
    file = f"configs/{module.__name__.rsplit('.', 1)[-1]}.py"
    with pytest.raises(ValueError) as error:
        module.get_config("bn=64")
    assert str(error.value) == f"{file}: bn must be one of paper, global; got '64'"
    with pytest.raises(ValueError) as error:
        module.get_config("depth=50")
    assert str(error.value) == f"{file} takes bn; got 'depth'"


def command_line_config(*argv):
    """The config main would get from these flags (ml_collections' own parsing)."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                    sys_argv=["main", *argv])
    values(["main", *argv])
    return values.config


def test_global_bn_is_an_argument_on_the_command_line():
    path = str(REPO / "configs/resnet50.py")
    assert command_line_config(f"--config={path}").model.bn_group_size == 32
    assert command_line_config(f"--config={path}:bn=global").model.bn_group_size is None
    assert command_line_config(f"--config={path}", "--config.model.bn_group_size=64").model.bn_group_size == 64
    # ml_collections parses an int field's override as an int: None cannot be given that way,
    # which is why global BN is the config's argument.
    with pytest.raises(flags.IllegalFlagValueError, match="invalid literal for int"):
        command_line_config(f"--config={path}", "--config.model.bn_group_size=None")


@pytest.mark.parametrize("name, suggested", [
    ("resnet20", "--config=cifar:depth=20"), ("plain56", "--config=cifar:depth=56,plain=True"),
    ("cifar_resnet110", "--config=cifar:depth=110"), ("resnet51", None)])
def test_a_cifar_network_by_name_suggests_the_cifar_config(name, suggested):
    from resnet_jax.cli import config_files

    with pytest.raises(ValueError) as raised:
        config_files.resolve(name)
    message = str(raised.value)
    assert message.startswith(f"{name!r} is neither a file nor the name of a shipped config")
    assert (suggested in message) if suggested else ("cifar:" not in message), message


@pytest.mark.parametrize("name", config_files.shipped())
def test_a_central_crop_keeps_most_of_the_image(name):
    # The "center" and "ten_crop" evals resize the shorter side to resize_size, then crop
    # image_size (ImageNet's 224 of 256). The small-image configs had kept 256: their crops were
    # a speck of each image, and an eval of the quickstart with them scored chance.
    config = runpy.run_path(config_files.resolve(name))["get_config"]()
    for image_size in (config.data.image_size, 32, 64):  # and as a user overrides it
        config.data.image_size = image_size
        s = preprocess.settings(config.data)
        assert 0.75 <= s.image_size / s.resize_size <= 1, (name, s.image_size, s.resize_size)
