"""The parametrised configs' arguments: good ones set the fields, bad ones stop with one line."""

import pytest

from configs import cifar, preact_cifar, vgg


def test_arguments_set_the_network():
    assert cifar.get_config("depth=56,plain=True").model.name == "cifar_plain56"
    assert cifar.get_config("val=True").data.eval_split == "train[45000:]"
    assert vgg.get_config("depth=19,bn=True").model.name == "vgg19_bn"
    config = preact_cifar.get_config("depth=110")
    assert (config.model.name, config.model.block_order) == ("cifar_resnet110", "pre")


@pytest.mark.parametrize("module, arg, message", [
    (cifar, "plain=true", "configs/cifar.py: plain must be True or False; got 'true'"),
    (cifar, "depth=abc", "configs/cifar.py: depth must be an integer; got 'abc'"),
    (cifar, "width=3", "configs/cifar.py takes depth, plain, shortcut, val; got 'width'"),
    (vgg, "bn=yes", "configs/vgg.py: bn must be True or False; got 'yes'"),
    (preact_cifar, "val=1", "configs/preact_cifar.py: val must be True or False; got '1'"),
    (preact_cifar, "depth=56", "configs/preact_cifar.py: depth must be one of 110, 164, 1001; got 56"),
])
def test_bad_arguments_name_the_field(module, arg, message):
    with pytest.raises(ValueError) as error:
        module.get_config(arg)
    assert str(error.value) == message
