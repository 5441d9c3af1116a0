"""Parameter and multiply-add counts against the paper's Table 1, Sec. 4.2 and XLA."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from resnet_jax import flops, models


def abstract(name: str, **overrides) -> models.ResNet:
    """The model's structure and shapes without its values: counting needs nothing more."""
    num_classes = 10 if name.startswith("cifar") else 1000
    return nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0),
                                                **overrides))


@pytest.mark.parametrize("stride_on", ["1x1", "3x3"])
@pytest.mark.parametrize("depth, params", [
    (18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160), (152, 60_192_808)])
def test_imagenet_parameters(depth, params, stride_on):
    assert flops.count_params(abstract(f"resnet{depth}", stride_on=stride_on)) == params


@pytest.mark.parametrize("depth, params", [
    (20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962)])
def test_cifar_parameters(depth, params):
    assert flops.count_params(abstract(f"cifar_resnet{depth}")) == params
    # Option B projects at the two down-sampling blocks: 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
    assert flops.count_params(abstract(f"cifar_resnet{depth}", shortcut="B")) == params + 2_752
    # "no extra parameter" (Sec. 4.1): the plain twin of an option-A net has as many.
    assert flops.count_params(abstract(f"cifar_plain{depth}")) == params


@pytest.mark.slow
def test_cifar_1202_parameters():
    # Built for real: tracing 600 blocks abstractly is slower in this Flax than making them.
    model = models.create("cifar_resnet1202", num_classes=10, rngs=nnx.Rngs(0))
    assert flops.count_params(model) == 19_421_274


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_plain_imagenet_parameters_equal_option_a(depth):
    assert flops.count_params(abstract(f"plain{depth}")) == flops.count_params(
        abstract(f"resnet{depth}", shortcut="A"))


@pytest.mark.slow
@pytest.mark.parametrize("depth, macs", [
    (18, 1_814_073_344), (34, 3_663_761_408), (50, 3_857_973_248), (101, 7_570_194_432),
    (152, 11_282_415_616)])
def test_imagenet_macs_stride_on_1x1(depth, macs):
    assert flops.count_macs(abstract(f"resnet{depth}")) == macs


@pytest.mark.slow
@pytest.mark.parametrize("depth, macs", [
    (18, 1_814_073_344), (50, 4_089_184_256), (101, 7_801_405_440), (152, 11_513_626_624)])
def test_imagenet_macs_stride_on_3x3(depth, macs):
    assert flops.count_macs(abstract(f"resnet{depth}", stride_on="3x3")) == macs


def test_macs_of_other_sizes_and_a_real_model():
    model = models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(0))
    model.train()
    # Hand count, Sec. 4.2: 3x3 convs on 32x32x16, 16x16x32, 8x8x64 maps, a 64 -> 10 classifier.
    first = 32 * 32 * 16 * 3 * 9
    stage = lambda size, cin, cout, n: size * size * cout * 9 * (cin + cout + (2 * n - 2) * cout)
    expected = first + 32 * 32 * 16 * 9 * 16 * 6 + stage(16, 16, 32, 3) + stage(8, 32, 64, 3) + 640
    assert flops.count_macs(model, 32) == expected
    assert model.bn1.use_running_average is False  # the count left the model in train mode
    assert flops.count_macs(model, (32, 64)) == 2 * (expected - 640) + 640


def xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


class ConvAndDense(nnx.Module):
    """Unpadded strided and grouped convolutions and a dense layer: XLA counts each tap."""

    def __init__(self, rngs):
        self.a = nnx.Conv(3, 8, (3, 3), (2, 2), padding="VALID", use_bias=False, rngs=rngs)
        self.b = nnx.Conv(8, 16, (5, 3), (1, 2), padding="VALID", feature_group_count=4,
                          use_bias=False, rngs=rngs)
        self.c = nnx.Linear(16, 7, use_bias=False, rngs=rngs)
        self.in_channels = 3

    def __call__(self, x):
        return self.c(self.b(self.a(x)).reshape(-1, 16))


def test_macs_equal_xla_cost_analysis_without_padding():
    model = ConvAndDense(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    image = jax.ShapeDtypeStruct((1, 23, 31, 3), jnp.float32)
    total = xla_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, image)
    assert 2 * flops.count_macs(model, (23, 31)) == total


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_macs_agree_with_xla_cost_analysis_of_the_network(name):
    """XLA skips the kernel taps that fall on zero padding and adds BN's and ReLU's arithmetic.

    Both are a few per cent at 224: its count lies within 8% below twice our multiply-adds.
    """
    model = models.create(name, num_classes=1000, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    ratio = xla_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, image) / (2 * flops.count_macs(model))
    assert 0.92 < ratio < 1.0


@pytest.mark.parametrize("device_kind, per_device", [
    ("TPU v2", 22.5e12), ("TPU v3", 61.5e12),  # a device is one of the chip's two TensorCores
    ("TPU v4", 275e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),  # megacore: a device is a chip
    ("TPU v5 lite", 197e12), ("TPU v6 lite", 918e12),  # one TensorCore per chip
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("cpu", None), ("TPU v7x", None)])
def test_peak_flops_is_per_device(device_kind, per_device):
    assert flops.peak_flops(device_kind) == per_device


@pytest.mark.parametrize("devices, chips, kind", [(8, 4, "TPU v3"), (32, 16, "TPU v2"), (16, 16, "TPU v4"),
                                                  (4, 4, "TPU v5")])
def test_a_slices_peak_is_its_chips_peak(devices, chips, kind):
    """MFU divides by the per-device peak times jax.device_count(): a v3-8 (4 chips, 8 devices)
    peaks at 4 x 123 TFLOPS, a v4-32 (16 chips, 16 devices) at 16 x 275 (Cloud TPU's pages)."""
    per_chip = {"TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5": 459e12}[kind]
    assert devices * flops.peak_flops(kind) == pytest.approx(chips * per_chip)


def test_every_listed_kind_reads_its_own_peak():
    # The longest prefix wins whatever the table's order: "TPU v5 lite" is not a v5p.
    for kind, peak in flops.PEAK_FLOPS.items():
        assert flops.peak_flops(kind) == peak
        assert flops.peak_flops(kind + " (any suffix)") == peak
