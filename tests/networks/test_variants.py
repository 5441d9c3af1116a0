"""The variants of the residual-learning literature: block orders (He et al. 2016; Gross and
Wilber 2016), highway gates (Srivastava et al. 2015), lesioned blocks (Veit et al. 2016), and
the bottleneck CIFAR networks of He et al. 2016 with their configs and sweep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import preact_cifar
from resnet_jax import convert, flops, models
from resnet_jax.training import steps
from runs import REPO


def images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def create(name, **options):
    return models.create(name, num_classes=10, rngs=nnx.Rngs(0), **options)


def abstract(name, **options):
    return nnx.eval_shape(lambda: create(name, **options))


def hand_count(stage_sizes, block, *, order="post", shortcut="A", gate="none", width=16,
               stem="cifar", classes=10):
    """Parameters by the papers' description: convolution weights, BN scale and bias, gate
    weights and biases, the classifier."""
    expansion = 4 if block == "bottleneck" else 1
    pre = order == "pre"
    total = 3 * width * (49 if stem == "imagenet" else 9)
    stem_bn = not pre or stem == "imagenet"
    total += 2 * width if stem_bn else 0
    features = width
    for i, size in enumerate(stage_sizes):
        f = width * 2**i
        for j in range(size):
            convs = ([(features, f, 3), (f, f, 3)] if block == "basic" else
                     [(features, f, 1), (f, f, 3), (f, 4 * f, 1)])
            out = f * expansion
            total += sum(cin * cout * k * k for cin, cout, k in convs)
            # BN: on each convolution's output; in "pre" on its input, but the first block after
            # the ImageNet stem's BN-ReLU has no BN of its own before its first convolution.
            bns = [cin for cin, _, _ in convs] if pre else [cout for _, cout, _ in convs]
            if pre and stem_bn and i + j == 0:
                bns = bns[1:]
            total += 2 * sum(bns)
            reshapes = i > 0 and j == 0 or features != out
            if shortcut == "C" or (shortcut == "B" and reshapes):
                total += features * out + (0 if pre else 2 * out)  # pre-activation: no BN
            if gate == "highway":
                total += features * out + out
            features = out
    total += 2 * features if pre else 0  # the final BN-ReLU
    return total + features * classes + classes


@pytest.mark.parametrize("order", models.BLOCK_ORDERS)
@pytest.mark.parametrize("gate", models.GATES)
@pytest.mark.parametrize("name, stage_sizes, block, shortcut", [
    ("cifar_resnet14", (2, 2, 2), "basic", "A"),
    ("cifar_resnet14", (2, 2, 2), "basic", "C"),
    ("cifar_resnet20", (2, 2, 2), "bottleneck", "B"),
])
def test_parameters_of_every_order_and_gate_by_hand(order, gate, name, stage_sizes, block, shortcut):
    model = abstract(name, block=block, shortcut=shortcut, block_order=order, gate=gate)
    assert flops.count_params(model) == hand_count(stage_sizes, block, order=order,
                                                   shortcut=shortcut, gate=gate)


@pytest.mark.parametrize("name, stage_sizes, block", [
    ("resnet18", (2, 2, 2, 2), "basic"), ("resnet50", (3, 4, 6, 3), "bottleneck")])
def test_imagenet_pre_activation_parameters_by_hand(name, stage_sizes, block):
    model = abstract(name, block_order="pre")
    assert flops.count_params(model) == hand_count(stage_sizes, block, order="pre", shortcut="B",
                                                   width=64, stem="imagenet")
    # Against the paper's count (option B, 10 classes): the BNs move, the projections lose theirs.
    assert hand_count(stage_sizes, block, shortcut="B", width=64, stem="imagenet") == \
        flops.count_params(abstract(name))


def test_hand_count_agrees_with_the_papers_cifar_numbers():
    assert hand_count((3, 3, 3), "basic") == 269_722  # ResNet-20, Sec. 4.2
    assert hand_count((18, 18, 18), "basic") == 1_727_962  # ResNet-110


@pytest.mark.slow
def test_preact_164_and_1001_parameters_as_he_et_al_2016():
    """"1.7M" and "10.2M" (He et al. 2016), the options from configs/preact_cifar.py."""
    bn_params = lambda model: sum(
        np.prod(v.shape) for path, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
        if any("bn" in str(getattr(k, "key", "")) for k in path))
    config = preact_cifar.get_config("depth=164")
    model = steps.create_model(config, 10)
    count = flops.count_params(model)
    assert count == hand_count((18, 18, 18), "bottleneck", order="pre", shortcut="B") == 1_703_258
    assert round(count / 1e6, 1) == 1.7
    assert count - bn_params(model) == 1_679_034  # 1.7M either way

    # ResNet-1001: the paper's 10.2M is the count without BN's scales and biases (10.18M).
    count_1001 = hand_count((111, 111, 111), "bottleneck", order="pre", shortcut="B")
    # BN before each convolution: (block input, filters, filters); first blocks, then the other
    # 110 of each stage, then the final BN.
    bn_1001 = 2 * ((16 + 16 + 16) + 110 * (64 + 16 + 16) + (64 + 32 + 32) + 110 * (128 + 32 + 32)
                   + (128 + 64 + 64) + 110 * (256 + 64 + 64) + 256)
    assert round((count_1001 - bn_1001) / 1e6, 1) == 10.2
    model = steps.create_model(preact_cifar.get_config("depth=1001"), 10)
    assert flops.count_params(model) == count_1001
    assert bn_params(model) == bn_1001


def test_preact_cifar_config():
    for depth, block, shortcut in [(110, "basic", "A"), (164, "bottleneck", "B"),
                                   (1001, "bottleneck", "B")]:
        config = preact_cifar.get_config(f"depth={depth}")
        model = config.model
        assert (model.name, model.block, model.shortcut, model.block_order) == \
            (f"cifar_resnet{depth}", block, shortcut, "pre")
        schedule = config.schedule
        assert (schedule.warmup_steps, schedule.warmup_lr, schedule.base_lr) == (400, 0.01, 0.1)
        assert (config.train.batch_size, config.train.num_steps) == (128, 64_000)
        assert tuple(config.schedule.boundaries_steps) == (32_000, 48_000)
        assert config.optimizer.weight_decay == 1e-4 and config.optimizer.momentum == 0.9
    with pytest.raises(ValueError, match="depth must be one of 110, 164, 1001"):
        preact_cifar.get_config("depth=56")


def test_cifar_bottleneck_networks_are_9n_plus_2():
    model = abstract("cifar_resnet29", block="bottleneck")
    assert [len(stage) for stage in model.stages] == [3, 3, 3]
    assert all(isinstance(b.block, models.BottleneckBlock) for b in models.blocks(model))
    assert model.stages[2][0].conv3.out_features == 256 and model.fc.in_features == 256
    with pytest.raises(ValueError, match=r"9n\+2 with n >= 1 .*got 21 in 'cifar_resnet21'"):
        create("cifar_resnet21", block="bottleneck")


def test_sweep_block_order_expands_to_each_order_and_depth(monkeypatch):
    sweep = pytest.importorskip("launch.sweep")
    monkeypatch.chdir(REPO)  # a sweep names its config files from the repository root
    runs = sweep.expand("configs/sweep_block_order.py", "/base")
    assert len(runs) == 12 and len({run.name for run in runs}) == 12
    assert runs[1].name == "cifar_depth-20_block_order-pre"
    assert runs[1].config == "configs/cifar.py:depth=20"
    assert runs[1].overrides == (("model.block_order", "pre"),)
    for run in runs[:4]:  # every order builds (abstractly)
        config = sweep.load_config(run.config)
        config.model.block_order = dict(run.overrides)["model.block_order"]
        nnx.eval_shape(lambda: steps.create_model(config, 10))


def first_channels_subsampled(maps, factor, channels):
    return maps["stem"][:, ::factor, ::factor, :channels]


@pytest.mark.slow
@pytest.mark.parametrize("name, block", [("cifar_resnet14", "basic"), ("cifar_resnet11", "bottleneck")])
def test_pre_activation_blocks_with_zero_branches_are_identities(name, block):
    # Nothing on the identity path: with each branch's last convolution zeroed, a block that does
    # not open a stage passes its input on unchanged, negative values included, which a ReLU
    # after the addition would have removed. A block that opens a stage shares its first BN-ReLU
    # with the shortcut (He et al. 2016, Sec. 4.1), here option A: subsampled, zeros appended.
    model = create(name, block=block, block_order="pre")
    for info in models.blocks(model):
        kernel = getattr(info.block, f"conv{info.block.depth}").kernel
        kernel[...] = jnp.zeros_like(kernel[...])
    opening = 0
    for info in models.blocks(model):
        b = info.block
        x = images((2, 8, 8, b.in_features))
        assert np.any(np.asarray(x) < 0)
        if not b.opens_stage:
            np.testing.assert_array_equal(b(x), x)
            continue
        opening += 1
        shared = x if b.bn1 is None else nnx.relu(b.bn1(x))
        expected = shared[:, ::b.stride, ::b.stride, :]
        out = b(x)
        np.testing.assert_allclose(out[..., :b.in_features], expected, rtol=1e-6, atol=1e-6)
        assert not np.any(np.asarray(out[..., b.in_features:]))
    assert opening == 3
    # The stem is conv-BN-ReLU and the first block does not pre-activate again.
    first = models.blocks(model)[0].block
    assert first.bn1 is None and model.bn1 is not None
    maps = model.features(images((2, 16, 16, 3)))
    np.testing.assert_array_equal(maps["stage1"][..., :16], maps["stem"])
    # The final BN-ReLU follows the last stage.
    expected = nnx.relu(model.bn_final(maps["stage3"])).mean((1, 2))
    np.testing.assert_allclose(maps["pooled"], expected, rtol=1e-6, atol=1e-6)


def test_imagenet_pre_activation_stem_and_first_block():
    model = abstract("resnet50", block_order="pre")
    first, second = model.stages[0][0], model.stages[0][1]
    assert model.bn1 is not None and model.max_pool  # conv-BN-ReLU-max-pool
    assert first.bn1 is None and second.bn1.scale.shape == (256,)  # the stem pre-activated it
    assert first.projection.bn is None and first.projection.conv.in_features == 64
    assert model.bn_final.scale.shape == (2048,)


def test_pre_activation_projection_reads_the_pre_activated_input():
    block = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), block_order="pre",
                          shortcut="B").stages[1][0]
    block.eval()
    x = images((2, 8, 8, 16))
    preactivated = nnx.relu(block.bn1(x))
    expected = block.branch(preactivated) + block.projection.conv(preactivated)
    np.testing.assert_allclose(block(x), expected, rtol=1e-5, atol=1e-6)


def test_no_final_relu_lets_negative_values_through():
    x = images((2, 16, 16, 3))
    no_relu = create("cifar_resnet14", block_order="no_final_relu").features(x)
    post = create("cifar_resnet14").features(x)
    for stage in ("stage1", "stage2", "stage3"):
        assert np.any(np.asarray(no_relu[stage]) < 0)
        assert np.all(np.asarray(post[stage]) >= 0)
    assert np.all(np.asarray(no_relu["stem"]) >= 0)  # the stem keeps its ReLU


def test_bn_after_add_normalises_the_sum():
    # The branch's last BN moves after the addition: the same parameters, and with that BN's
    # scale and bias at zero every block puts out relu(0) = 0, shortcut and all; in "post" the
    # same BN zeroes the branch alone, and the shortcut passes.
    assert flops.count_params(abstract("cifar_resnet14", block_order="bn_after_add")) == \
        flops.count_params(abstract("cifar_resnet14"))
    x = images((2, 16, 16, 3))
    for order, zero in [("bn_after_add", True), ("post", False)]:
        model = create("cifar_resnet14", block_order=order)
        model.eval()
        for info in models.blocks(model):
            assert info.block.bn2.scale.shape == (info.block.out_features,)
            info.block.bn2.scale[...] = jnp.zeros_like(info.block.bn2.scale[...])
            info.block.bn2.bias[...] = jnp.zeros_like(info.block.bn2.bias[...])
        maps = model.features(x)
        assert (not np.any(np.asarray(maps["stage1"]))) == zero
        assert np.any(np.asarray(maps["stem"]))


def test_highway_gate_shape_and_bias():
    model = create("cifar_resnet14", gate="highway", gate_bias=-3.0)
    for info in models.blocks(model):
        gate = info.block.gate.conv
        assert gate.kernel.shape == (1, 1, info.block.in_features, info.block.out_features)
        assert gate.strides == ((2, 2) if info.downsamples else (1, 1))
        np.testing.assert_array_equal(gate.bias[...], np.full(info.block.out_features, -3.0))


@pytest.mark.parametrize("order", ["post", "pre"])
def test_closed_highway_gates_pass_the_shortcut_unchanged(order):
    model = create("cifar_resnet14", gate="highway", gate_bias=-100.0, block_order=order)
    for info in models.blocks(model):
        b = info.block
        x = images((2, 8, 8, b.in_features))
        carried = x
        if order == "pre" and b.opens_stage and b.bn1 is not None:
            carried = nnx.relu(b.bn1(x))  # the pre-activation the stage's first block shares
        expected = models.zero_padding_shortcut(carried, b.out_features, b.stride)
        if order == "post":
            expected = nnx.relu(expected)
        np.testing.assert_allclose(b(x), expected, rtol=0, atol=1e-6)


def test_highway_block_mixes_branch_and_shortcut():
    block = create("cifar_resnet8", gate="highway", gate_bias=0.0, shortcut="B").stages[1][0]
    block.eval()
    x = nnx.relu(images((2, 8, 8, 16)))
    transform = jax.nn.sigmoid(block.gate.conv(x))
    assert 0.2 < float(transform.mean()) < 0.8  # half open
    expected = nnx.relu(transform * block.branch(x) + (1 - transform) * block.projection(x))
    np.testing.assert_allclose(block(x), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(block(x), nnx.relu(block.branch(x) + block.projection(x)), atol=1e-3)


def zero_branch(block):
    """The branch's output made exactly zero by its weights: its last BN's scale and bias where
    the branch ends in that BN, else its last convolution's kernel."""
    if block.order in ("post", "no_final_relu"):
        bn = getattr(block, f"bn{block.depth}")
        for variable in (bn.scale, bn.bias):
            variable[...] = jnp.zeros_like(variable[...])
    else:
        kernel = getattr(block, f"conv{block.depth}").kernel
        kernel[...] = jnp.zeros_like(kernel[...])


@pytest.mark.parametrize("order", models.BLOCK_ORDERS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_lesioning_a_block_equals_zeroing_its_branch(order, mode):
    x = images((4, 16, 16, 3))
    reference = create("cifar_resnet14", block_order=order, shortcut="B")
    for index in (1, 2):  # an identity block and a down-sampling (projecting) one
        lesioned, zeroed = nnx.clone(reference), nnx.clone(reference)
        getattr(lesioned, mode)()
        getattr(zeroed, mode)()
        models.blocks(lesioned)[index].block.lesioned = True
        zero_branch(models.blocks(zeroed)[index].block)
        np.testing.assert_allclose(lesioned(x), zeroed(x), rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.asarray(lesioned(x)), np.asarray(reference(x)), atol=1e-4)


def test_lesioned_highway_block_keeps_only_the_shortcut():
    # The gate goes with the branch: lesioning equals shutting the gate.
    x = images((2, 16, 16, 3))
    model = create("cifar_resnet14", gate="highway", shortcut="B")
    model.eval()
    shut = nnx.clone(model)
    gate = models.blocks(shut)[2].block.gate.conv
    gate.bias[...] = jnp.full_like(gate.bias[...], -100.0)
    models.blocks(model)[2].block.lesioned = True
    np.testing.assert_allclose(model(x), shut(x), rtol=1e-5, atol=1e-5)


def test_lesioned_post_block_is_relu_of_its_shortcut():
    block = create("cifar_resnet8", shortcut="B").stages[1][0]
    block.eval()
    block.lesioned = True
    x = images((2, 8, 8, 16))
    np.testing.assert_array_equal(block(x), nnx.relu(block.projection(x)))


def test_lesioning_plain_blocks():
    model = create("cifar_plain14")
    infos = models.blocks(model)
    x = images((2, 8, 8, 16))
    infos[1].block.lesioned = True
    np.testing.assert_array_equal(infos[1].block(x), x)  # the identity
    infos[2].block.lesioned = True  # down-samples: nothing could stand in for it
    with pytest.raises(ValueError, match="lesioned plain block .*16 -> 32 channels, stride 2") as error:
        model(images((2, 16, 16, 3)))
    assert "\n" not in str(error.value)


def test_blocks_in_depth_order():
    infos = models.blocks(create("cifar_resnet14"))
    assert [i.name for i in infos] == ["stage1.0", "stage1.1", "stage2.0", "stage2.1", "stage3.0", "stage3.1"]
    assert [i.downsamples for i in infos] == [False, False, True, False, True, False]
    assert all(i.block.lesioned is False for i in infos)
    bottleneck = models.blocks(abstract("cifar_resnet11", block="bottleneck"))
    assert [(i.downsamples, i.reshapes) for i in bottleneck] == [(False, True), (True, True), (True, True)]
    with pytest.raises(ValueError, match=r"scan_blocks=False.*convert\.transfer"):
        models.blocks(abstract("cifar_resnet20", scan_blocks=True))


def test_lesion_is_not_a_parameter():
    model = create("cifar_resnet8")
    before = jax.tree.structure(nnx.state(model))
    models.blocks(model)[0].block.lesioned = True
    assert jax.tree.structure(nnx.state(model)) == before


def test_transfer_of_variants_between_layouts():
    options = dict(block_order="pre", gate="highway", shortcut="B")
    scanned = create("cifar_resnet20", scan_blocks=True, **options)
    unrolled = models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(3), **options)
    convert.transfer(scanned, unrolled)
    keyed = lambda model: {key: convert._read(variable, index)
                           for key, variable, index, _ in convert._tensors(model)}
    source, copied = keyed(scanned), keyed(unrolled)
    assert {"layer3.2.gate.weight", "layer3.2.gate.bias", "bn_final.weight"} <= set(copied)
    # The pre-activation stem is conv-BN-ReLU, its first block has no BN of its own, and the
    # projections have no BN (their input is pre-activated).
    assert "bn1.weight" in copied and "layer1.0.bn1.weight" not in copied
    assert "layer2.0.downsample.1.weight" not in copied
    assert len(copied) == len(jax.tree.leaves(nnx.state(unrolled)))  # every variable has a key
    for key, value in source.items():
        np.testing.assert_array_equal(copied[key], value, err_msg=key)
    with pytest.raises(ValueError, match="block_order='post' and gate='none'"):
        convert.to_torchvision(abstract("resnet18", stride_on="3x3", block_order="pre"))


@pytest.mark.parametrize("name, options, message", [
    ("cifar_resnet8", {"block_order": "middle"},
     "block_order must be one of 'post', 'pre', 'no_final_relu', 'bn_after_add'; got 'middle'"),
    ("cifar_resnet8", {"gate": "lstm"}, "gate must be one of 'none', 'highway'; got 'lstm'"),
    ("cifar_resnet8", {"gate": "highway", "gate_bias": "low"}, "gate_bias must be a number; got 'low'"),
    ("cifar_plain8", {"gate": "highway"}, "gate='highway' needs a residual network"),
    ("cifar_plain8", {"block_order": "bn_after_add"}, "block_order='bn_after_add' .*plain"),
    ("cifar_resnet8", {"block_order": "pre", "zero_init_residual": True}, "zero_init_residual .*'pre'"),
    ("cifar_resnet8", {"block": "wide"}, "block must be one of 'basic', 'bottleneck'; got 'wide'"),
    ("resnet50", {"block": "basic"}, "block of resnet50 is 'bottleneck'"),
])
def test_bad_variant_options_raise_one_line(name, options, message):
    with pytest.raises(ValueError, match=message) as error:
        create(name, **options)
    assert "\n" not in str(error.value)
