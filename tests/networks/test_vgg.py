"""VGG-16 and VGG-19 (the paper's baselines, Sec. 3.3 and Table 3): counts, torchvision
equivalence, dropout, options and a training run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import quickstart, vgg as vgg_config
from resnet_jax import convert, flops, models, vgg
from resnet_jax.run import jsonl, validate
from resnet_jax.training import loop
from test_convert import torchvision_net


def abstract(name, **options):
    return nnx.eval_shape(lambda: models.create(name, num_classes=1000, rngs=nnx.Rngs(0), **options))


def hand_counts(stacks, batch_norm, classes=1000, size=224):
    """(parameters, convolution multiply-adds, fully connected multiply-adds) from the layout."""
    params = conv_macs = 0
    channels, side = 3, size
    for i, n in enumerate(stacks):
        filters = 64 * 2 ** min(i, 3)
        for _ in range(n):
            params += 9 * channels * filters + filters + (2 * filters if batch_norm else 0)
            conv_macs += side * side * 9 * channels * filters
            channels = filters
        side //= 2
    dense = [(512 * 7 * 7, 4096), (4096, 4096), (4096, classes)]
    params += sum(i * o + o for i, o in dense)
    return params, conv_macs, sum(i * o for i, o in dense)


@pytest.mark.slow
@pytest.mark.parametrize("name, params, conv_macs, all_macs", [
    ("vgg16", 138_357_544, 15_346_630_656, 15_470_264_320),
    ("vgg19", 143_667_240, 19_508_428_800, 19_632_062_464),
])
def test_counts(name, params, conv_macs, all_macs):
    model = abstract(name)
    stacks = vgg.STACKS[int(name[3:])]
    assert hand_counts(stacks, False) == (params, conv_macs, all_macs - conv_macs)
    assert flops.count_params(model) == params
    assert flops.macs_by_kind(model, 224) == {"conv": conv_macs, "dense": all_macs - conv_macs}
    assert flops.count_macs(model, 224) == all_macs
    # BN adds a scale and a bias per channel of each convolution, and no multiply-add counted.
    with_bn = abstract(name + "_bn")
    assert flops.count_params(with_bn) == hand_counts(stacks, True)[0]
    assert flops.count_macs(with_bn, 224) == all_macs


@pytest.mark.parametrize("size", [(7, 7), (1, 1), (2, 3), (8, 9), (13, 20), (14, 14), (32, 6)])
def test_adaptive_average_pool_equals_torch(size):
    x = np.random.RandomState(0).randn(2, *size, 5).astype(np.float32)
    expected = torch.nn.AdaptiveAvgPool2d(7)(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(vgg.adaptive_average_pool(jnp.asarray(x), 7))
    np.testing.assert_allclose(got, expected.transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def torchvision_vgg(name, seed=0):
    """A torchvision VGG in eval mode, with random weights and non-trivial BN statistics."""
    return torchvision_net(name, seed).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_logits_equal_torchvision_and_round_trip(name):
    net = torchvision_vgg(name)
    model = models.create(name, num_classes=1000, rngs=nnx.Rngs(1))
    state = net.state_dict()
    convert.from_torchvision(model, state)
    model.eval()
    graphdef, variables = nnx.split(model)
    forward = jax.jit(lambda variables, x: nnx.merge(graphdef, variables)(x))
    # 224: the maps reach the classifier at 7x7; 32: at 1x1, replicated to 7x7; 45x61: unequal windows.
    for shape in [(1, 224, 224, 3), (2, 32, 32, 3), (1, 45, 61, 3)]:
        images = np.random.RandomState(0).randn(*shape).astype(np.float32)
        with torch.no_grad():
            expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        got = np.asarray(forward(variables, jnp.asarray(images)))
        assert np.abs(expected).max() > 0.01  # not trivially small
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4, err_msg=str(shape))
    back = convert.to_torchvision(model)
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_dropout_only_in_train_mode():
    model = models.create("vgg16", num_classes=10, rngs=nnx.Rngs(0), width=4)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    without = model(x)
    model.train()
    first, second = model(x), model(x)
    assert not np.allclose(first, second)  # a new mask each call
    assert not np.allclose(first, without)
    # Half the hidden units are dropped, the others scaled by 2.
    hidden = nnx.relu(model.fc1(model.features(x)["pooled"]))
    dropped = model.dropout1(hidden)
    kept = np.asarray(dropped) != 0
    assert 0.4 < kept[np.asarray(hidden) != 0].mean() < 0.6
    np.testing.assert_allclose(np.asarray(dropped)[kept], 2 * np.asarray(hidden)[kept], rtol=1e-6)


@pytest.mark.slow
def test_structure_and_options():
    model = abstract("vgg19_bn", width=8, in_channels=1, dtype="bfloat16")
    assert len(model.convs) == 16 and len(model.bns) == 16
    assert [model.convs[i].out_features for i in (0, 2, 4, 8, 12)] == [8, 16, 32, 64, 64]
    assert model.fc1.in_features == 64 * 49 and model.total_stride == 32
    assert model.convs[0].in_features == 1 and model.convs[0].dtype == jnp.bfloat16
    assert abstract("vgg16").bns is None
    maps = models.create("vgg16", num_classes=3, rngs=nnx.Rngs(0), width=2).features(jnp.zeros((1, 64, 32, 3)))
    assert {k: v.shape for k, v in maps.items()} == {
        "stage1": (1, 32, 16, 2), "stage2": (1, 16, 8, 4), "stage3": (1, 8, 4, 8),
        "stage4": (1, 4, 2, 16), "stage5": (1, 2, 1, 16), "pooled": (1, 16 * 49)}


@pytest.mark.parametrize("call, message", [
    (lambda: abstract("vgg16", shortcut="A"), "option 'shortcut' does not apply to VGG networks \\(vgg16\\)"),
    (lambda: abstract("vgg19_bn", block_order="pre"), "option 'block_order' does not apply"),
    (lambda: abstract("vgg16", scan_blocks=True), "option 'scan_blocks' does not apply"),
    (lambda: abstract("vgg11"), "unknown model name 'vgg11'"),
    (lambda: abstract("vgg16", width=0), "width must be a positive integer"),
    (lambda: abstract("vgg16_bn", bn_momentum=1.0), "bn_momentum must be in"),
    (lambda: models.create("vgg16", num_classes=3, rngs=nnx.Rngs(0), width=1)(jnp.zeros((1, 16, 32, 3))),
     "at least 32x32"),
])
def test_bad_options_raise_one_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def tiny_vgg_config(**changes):
    """configs/vgg.py on 32x32 fake images, a VGG-16 of width 8 and a few steps."""
    config = vgg_config.get_config("depth=16,bn=True")
    config.model.width = 8
    config.data.update(dict(name="fake", image_size=32, num_classes=10, fake_num_train=16,
                            fake_num_eval=8, train_preprocess="none", eval_preprocess="none",
                            pca_lighting=0.0))
    config.train.update(dict(batch_size=4, num_steps=2))
    config.eval.update(dict(batch_size=8, every_steps=2))
    config.checkpoint.every_steps = 2
    config.log_every_steps = 1
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        setattr(config[section] if section else config, field, value)
    return config


@pytest.mark.slow
def test_vgg_trains_in_the_training_loop(tmp_path):
    state = loop.train_and_evaluate(tiny_vgg_config(), str(tmp_path))
    rows = jsonl.read_rows(str(tmp_path))
    assert [row["step"] for row in rows if "train_loss" in row] == [1, 2]
    assert np.isfinite(rows[-1]["eval_loss"]) and "eval_accuracy" in rows[-1]
    # The dropout streams are carried in the state: each step drew new masks.
    counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.model_state)
              if "count" in jax.tree_util.keystr(path)]
    assert len(counts) == 2 and all(int(c) == 2 for c in counts)


def test_resnet_fields_given_to_a_vgg_stop_the_setup(tmp_path):
    config = quickstart.get_config()
    config.model.name = "vgg16"
    with pytest.raises(validate.SetupError, match="model: option 'block' does not apply to VGG"):
        loop.setup(config, str(tmp_path))
    assert not (tmp_path / "config.json").exists()
