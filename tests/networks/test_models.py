"""The networks' structure and options: shortcuts, plain nets, BN, features, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from resnet_jax import flops, layers, models


def images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def blocks(model):
    return [block for stage in model.stages for block in stage]


def test_option_a_pads_with_exact_zeros():
    x = images((2, 9, 9, 16))
    y = models.zero_padding_shortcut(x, 32, 2)
    assert y.shape == (2, 5, 5, 32)
    np.testing.assert_array_equal(y[..., :16], x[:, ::2, ::2, :])
    assert not np.any(np.asarray(y[..., 16:]))


def test_option_a_carries_the_stem_through_a_residual_net_that_starts_as_identity():
    # With every branch's last BN scale at 0 (zero_init_residual), each block is relu(shortcut):
    # the last stage is the stem, subsampled by 4, with exactly zero channels appended.
    model = models.create("cifar_resnet14", num_classes=10, rngs=nnx.Rngs(0), zero_init_residual=True)
    maps = model.features(images((2, 16, 16, 3)))
    stem = maps["stem"]
    np.testing.assert_array_equal(maps["stage3"][..., :16], stem[:, ::4, ::4, :])
    assert not np.any(np.asarray(maps["stage3"][..., 16:]))
    assert np.any(np.asarray(stem) > 0)


@pytest.mark.slow
def test_plain_nets_have_no_shortcut_anywhere():
    # The same start as above: with no shortcut, every block's output is relu(0) = 0.
    for name in ["cifar_plain14", "plain18", "plain50"]:
        model = models.create(name, num_classes=10, rngs=nnx.Rngs(0), zero_init_residual=True)
        assert all(not b.residual and b.projection is None for b in blocks(model))
        maps = model.features(images((2, 32, 32, 3)))
        assert all(not np.any(np.asarray(maps[f"stage{i}"])) for i in range(1, len(model.stages) + 1))
        twin = models.create(name.replace("plain", "resnet"), num_classes=10, rngs=nnx.Rngs(0),
                             zero_init_residual=True)
        assert np.any(np.asarray(twin.features(images((2, 32, 32, 3)))["pooled"]))


@pytest.mark.parametrize("name, projections_b", [
    ("resnet18", 3), ("resnet50", 4), ("cifar_resnet20", 2)])
def test_projections_of_options_a_b_c(name, projections_b):
    def projections(shortcut):
        model = nnx.eval_shape(lambda: models.create(name, num_classes=10, rngs=nnx.Rngs(0),
                                                     shortcut=shortcut))
        return sum(b.projection is not None for b in blocks(model)), len(blocks(model))

    assert projections("A")[0] == 0
    assert projections("B")[0] == projections_b  # only where the shape changes
    count, total = projections("C")
    assert count == total  # every block


def test_option_c_parameters_by_hand():
    # CIFAR ResNet-20, option C: a 1x1 conv and a BN on each of the 9 blocks.
    hand = 3 * (16 * 16 + 32) + (16 * 32 + 64) + 2 * (32 * 32 + 64) + (32 * 64 + 128) + 2 * (64 * 64 + 128)
    model = nnx.eval_shape(lambda: models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(0),
                                                 shortcut="C"))
    assert flops.count_params(model) == 269_722 + hand


@pytest.mark.parametrize("stride_on, strided", [("1x1", "conv1"), ("3x3", "conv2")])
def test_stride_placement_in_bottleneck_blocks(stride_on, strided):
    model = nnx.eval_shape(lambda: models.create("resnet50", num_classes=10, rngs=nnx.Rngs(0),
                                                 stride_on=stride_on))
    for stage in model.stages[1:]:
        first = stage[0]
        for conv in ("conv1", "conv2", "conv3"):
            assert getattr(first, conv).strides == ((2, 2) if conv == strided else (1, 1))
        assert first.projection.conv.strides == (2, 2)
        assert first.conv2.padding == ((1, 1), (1, 1))  # symmetric, never "SAME"


def test_imagenet_feature_maps_and_stem():
    model = models.create("resnet18", num_classes=7, rngs=nnx.Rngs(0))
    maps = model.features(images((2, 64, 64, 3)))
    assert {k: v.shape for k, v in maps.items()} == {
        "stem": (2, 32, 32, 64), "stage1": (2, 16, 16, 64), "stage2": (2, 8, 8, 128),
        "stage3": (2, 4, 4, 256), "stage4": (2, 2, 2, 512), "pooled": (2, 512)}
    np.testing.assert_allclose(maps["pooled"], maps["stage4"].mean((1, 2)), rtol=1e-6)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.strides == (2, 2)
    assert model(images((2, 64, 64, 3))).shape == (2, 7)


def test_cifar_feature_maps_width_and_channels():
    model = models.create("cifar_resnet8", num_classes=100, rngs=nnx.Rngs(0), width=8, in_channels=1)
    maps = model.features(images((3, 32, 32, 1)))
    assert {k: v.shape for k, v in maps.items()} == {
        "stem": (3, 32, 32, 8), "stage1": (3, 32, 32, 8), "stage2": (3, 16, 16, 16),
        "stage3": (3, 8, 8, 32), "pooled": (3, 32)}
    assert model(images((3, 32, 32, 1))).shape == (3, 100)


def test_train_and_eval_switch_batch_norm():
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), bn_momentum=0.75)
    x = images((4, 8, 8, 3)) * 3 + 1
    model.eval()
    before = np.asarray(model(x))
    assert np.array_equal(np.asarray(model.bn1.mean[...]), np.zeros(16))  # eval leaves stats alone
    model.train()
    model(x)
    conv = np.asarray(model.conv1(x))
    np.testing.assert_allclose(model.bn1.mean[...], 0.25 * conv.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    n = conv.size // 16
    np.testing.assert_allclose(model.bn1.var[...], 0.75 + 0.25 * conv.var((0, 1, 2)) * n / (n - 1),
                               rtol=1e-5)
    model.eval()
    assert not np.allclose(np.asarray(model(x)), before)  # the moved statistics are used


@pytest.mark.slow
def test_identical_blocks_share_one_trace_and_match_calling_each_block(monkeypatch):
    model = models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(0))
    reference = nnx.clone(model)
    x = images((5, 6, 6, 3))  # a shape no other test traces
    traced = []
    block_call = models.Block.__call__
    monkeypatch.setattr(models.Block, "__call__", lambda self, x: traced.append(1) or block_call(self, x))
    models._block_forward_jit.clear_cache()
    logits = nnx.jit(lambda model, x: model(x))(model, x)
    # Per stage: the opening block and the two identical ones after it.
    assert len(traced) == 6
    monkeypatch.undo()
    h = nnx.relu(reference.bn1(reference.conv1(x)))
    for stage in reference.stages:
        for block in stage:
            h = block(h)  # the module itself, not the jitted function
    np.testing.assert_allclose(logits, reference.fc(h.mean((1, 2))), rtol=1e-5, atol=1e-6)
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    expected = jax.tree.leaves(nnx.state(reference, nnx.BatchStat))
    assert len(stats) == len(expected) == 2 * 19
    for got, want in zip(stats, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    last = model.stages[-1][-1].bn2
    assert not np.allclose(last.mean[...], 0) and not np.allclose(last.var[...], 1)  # they moved


def test_ghost_batch_norm_normalises_each_group_alone():
    ghost = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), bn_group_size=2)
    whole = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
    x = images((4, 8, 8, 3))
    got = ghost(x)
    halves = []
    for half in (x[:2], x[2:]):
        copy = nnx.clone(whole)
        halves.append((copy(half), copy))
    np.testing.assert_allclose(got, jnp.concatenate([h[0] for h in halves]), rtol=1e-5, atol=1e-5)
    # The running statistics move towards the mean of the groups' statistics.
    mean = (halves[0][1].bn1.mean[...] + halves[1][1].bn1.mean[...]) / 2
    np.testing.assert_allclose(ghost.bn1.mean[...], mean, rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(whole(x)), np.asarray(got), atol=1e-3)
    with pytest.raises(ValueError, match="bn_group_size=2 must divide the batch size 3"):
        ghost(x[:3])


@pytest.mark.parametrize("group_size, dtype", [(None, "float32"), (2, "float32"),
                                               (None, "bfloat16")])
def test_batch_norm_gradient_equals_differentiating_the_formula(group_size, dtype):
    # BN's backward pass is written by hand (layers.py); here JAX differentiates the textbook
    # forward pass, per group, and the two must agree for input, scale and bias.
    bn = models.BatchNorm(6, momentum=0.9, epsilon=1e-5, group_size=group_size,
                          zero_init=False, dtype=dtype, param_dtype="float32")
    bn.scale[...] = images((6,), seed=1) + 1
    bn.bias[...] = images((6,), seed=2)
    x = (images((4, 5, 3, 6)) * 3 + 2).astype(dtype)
    weights = images((4, 5, 3, 6), seed=3)
    graphdef, state = nnx.split(bn)

    def ours(x, scale, bias):
        model = nnx.merge(graphdef, state, copy=True)
        model.scale[...], model.bias[...] = scale, bias
        return (model(x).astype(jnp.float32) * weights).sum()

    def formula(x, scale, bias):
        group = group_size or x.shape[0]
        g = x.astype(jnp.float32).reshape((-1, group) + x.shape[1:])
        mean = g.mean((1, 2, 3), keepdims=True)
        var = jnp.square(g - mean).mean((1, 2, 3), keepdims=True)
        y = ((g - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
        return (y.astype(dtype).astype(jnp.float32) * weights).sum()

    args = (x, bn.scale[...], bn.bias[...])
    got, want = jax.grad(ours, (0, 1, 2))(*args), jax.grad(formula, (0, 1, 2))(*args)
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=tolerance, atol=tolerance * float(jnp.abs(w).max()))


def test_zero_init_residual_zeroes_only_the_last_bn_of_each_block():
    basic = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), zero_init_residual=True,
                          shortcut="C")
    bottleneck = models.ResNet((1, 1), block="bottleneck", stem="cifar", width=4, num_classes=3,
                               rngs=nnx.Rngs(0), zero_init_residual=True, shortcut="C")
    for block, last in [*((b, "bn2") for b in blocks(basic)), *((b, "bn3") for b in blocks(bottleneck))]:
        for name in ("bn1", "bn2", "bn3"):
            if hasattr(block, name):
                assert np.all(np.asarray(getattr(block, name).scale[...]) == (name != last)), name
        assert np.all(np.asarray(block.projection.bn.scale[...]) == 1)


@pytest.mark.parametrize("init_fan, fan", [("fan_in", 64), ("fan_out", 256)])
def test_he_initialisation(init_fan, fan):
    layers = models.Layers(0.9, 1e-5, None, jnp.float32, jnp.float32, init_fan)
    kernel = np.asarray(layers.conv(64, 256, 1, 1, nnx.Rngs(0)).kernel[...])
    std = np.sqrt(2.0 / fan)  # He et al. 2015, Eq. 10
    assert abs(kernel.std() / std - 1) < 0.03
    assert abs(kernel.mean()) < 0.05 * std
    assert np.abs(kernel).max() > 3 * std  # a Gaussian, not one truncated at two deviations


@pytest.mark.parametrize("backend, expected", [("cpu", "float32"), ("gpu", "bfloat16"),
                                               ("cuda", "bfloat16"), ("rocm", "bfloat16"),
                                               ("tpu", "bfloat16")])
def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_the_cpu(backend, expected):
    assert layers.compute_dtype("auto", backend) == jnp.dtype(expected)
    assert layers.compute_dtype("float32", backend) == jnp.float32


def test_the_configs_compute_in_the_auto_dtype_and_float16_is_refused():
    assert default.get_config().model.dtype == "auto"
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), dtype="auto")
    assert model.dtype == layers.compute_dtype("auto", jax.default_backend())
    with pytest.raises(ValueError, match=r"^dtype \(model.dtype\) 'float16' needs loss scaling.*"
                                         r"'auto', 'bfloat16' or 'float32'$"):
        models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), dtype="float16")


def test_batch_statistics_are_accurate_far_from_zero():
    # One pass over x - shift and its square: accurate where the shift (the running mean) is
    # near the batch mean, and within float32's reach of a two-pass variance at 10 standard
    # deviations from a zero shift (a new network's first step).
    x = np.asarray(images((8, 4, 4, 3))) * 0.5
    for offset, running_mean in [(5.0, 0.0), (1000.0, 999.0)]:
        bn = models.BatchNorm(3, momentum=0.0, epsilon=1e-5, group_size=None, zero_init=False,
                              dtype="float32", param_dtype="float32")
        bn.mean[...] = jnp.full((3,), running_mean)
        bn(jnp.asarray(x + offset))
        count = x.size // 3
        want = (x + offset).astype(np.float64).reshape(-1, 3).var(0) * count / (count - 1)
        np.testing.assert_allclose(bn.var[...], want, rtol=1e-4)
        np.testing.assert_allclose(bn.mean[...], (x + offset).reshape(-1, 3).mean(0), rtol=1e-6)


def test_bfloat16_compute_with_float32_parameters():
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), dtype="bfloat16")
    x = images((2, 8, 8, 3))
    assert model.features(x)["stage3"].dtype == jnp.bfloat16
    assert model(x).dtype == jnp.float32
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    half = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(half, nnx.Param))} == {jnp.dtype("bfloat16")}


@pytest.mark.parametrize("call, message", [
    (lambda: models.create("resnet42", num_classes=10, rngs=nnx.Rngs(0)), "18, 34, 50, 101, 152, 200"),
    (lambda: models.create("vgg11", num_classes=10, rngs=nnx.Rngs(0)), "cifar_resnet.*vgg16"),
    (lambda: models.create("cifar_resnet21", num_classes=10, rngs=nnx.Rngs(0)), "6n\\+2"),
    (lambda: models.create("cifar_plain2", num_classes=10, rngs=nnx.Rngs(0)), "6n\\+2"),
    (lambda: models.create("resnet18", num_classes=10, rngs=nnx.Rngs(0), shortcut="D"),
     "shortcut must be one of 'A', 'B', 'C'; got 'D'"),
    (lambda: models.create("resnet50", num_classes=10, rngs=nnx.Rngs(0), stride_on="7x7"),
     "stride_on must be one of '1x1', '3x3'"),
    (lambda: models.create("resnet18", num_classes=10, rngs=nnx.Rngs(0), shortcutt="A"),
     "unknown model option 'shortcutt'"),
    (lambda: models.create("resnet18", num_classes=0, rngs=nnx.Rngs(0)), "num_classes must be"),
    (lambda: models.create("resnet18", num_classes=10, rngs=nnx.Rngs(0), dtype="int8"), "dtype must be"),
    (lambda: models.create("resnet18", num_classes=10, rngs=nnx.Rngs(0), bn_group_size=0),
     "bn_group_size must be a positive integer"),
])
def test_bad_options_raise_one_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("shape, message", [
    ((8, 8, 3), r"rank 4\); got shape \(8, 8, 3\)"),
    ((1, 8, 8, 1), r"in_channels=3 channels .*got shape \(1, 8, 8, 1\)"),
    ((1, 3, 8, 8), r"in_channels=3"),
])
def test_bad_inputs_raise_one_line(shape, message):
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message) as error:
        model(jnp.zeros(shape))
    assert "\n" not in str(error.value)
