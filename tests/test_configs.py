"""The parametrised configs' arguments: good ones set the fields, bad ones stop with one line."""

import pytest
from flax import nnx

from configs import cifar, preact_cifar, resnet200, vgg
from resnet_jax import models, train


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


def test_resnet200_is_the_pre_activation_network():
    """He et al. 2016: full pre-activation bottleneck units, the extra BN-ReLU after the last."""
    config = resnet200.get_config()
    model = nnx.eval_shape(lambda: train.create_model(config, 1000))  # shapes only: cheap
    blocks = models.blocks(model)
    assert [len(stage) for stage in model.stages] == [3, 24, 36, 3]
    assert {type(info.block).__name__ for info in blocks} == {"BottleneckBlock"}
    assert {info.block.order for info in blocks} == {"pre"}
    assert model.bn_final is not None and config.model.shortcut == "B"
