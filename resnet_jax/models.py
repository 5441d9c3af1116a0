"""Deep residual networks and their plain twins as Flax NNX modules.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385):
the ImageNet networks of Table 1, the CIFAR-10 networks of Sec. 4.2, the shortcut options A, B
and C of Sec. 3.3, and the plain networks of Table 2 and Fig. 6.

    model = create("resnet50", num_classes=1000, rngs=nnx.Rngs(0), stride_on="3x3")
    logits = model(images)              # NHWC; model.train() / model.eval() switch BN
    maps = model.features(images)       # "stem", "stage1".., "pooled"

`scan_blocks=True` runs the identical blocks of each stage as one scanned block and
`remat=True` recomputes each block's activations in the backward pass (see `ResNet`).
"""

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax import conv

SHORTCUTS = ("A", "B", "C")
STRIDE_ON = ("1x1", "3x3")
INIT_FANS = ("fan_in", "fan_out")
STEMS = ("imagenet", "cifar")
CONV_WEIGHT_GRADS = ("auto", "xla", "matmul")

# Table 1: blocks per stage and block kind. 200 is He et al. 2016 ("Identity Mappings"), Sec. 4.
IMAGENET_DEPTHS = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
    152: ((3, 8, 36, 3), "bottleneck"),
    200: ((3, 24, 36, 3), "bottleneck"),
}

NAMES = (
    "resnet{18,34,50,101,152,200}, plain{18,34,50,101,152,200}, "
    "cifar_resnet{6n+2}, cifar_plain{6n+2} (e.g. cifar_resnet20, cifar_plain56)"
)
_NAME = re.compile(r"(resnet|plain|cifar_resnet|cifar_plain)(\d+)")

# What `create` lets a caller change; the name fixes the rest (depth, block kind, stem).
OPTIONS = (
    "shortcut", "stride_on", "zero_init_residual", "bn_momentum", "bn_epsilon", "bn_group_size",
    "dtype", "param_dtype", "width", "init_fan", "in_channels", "scan_blocks", "remat",
    "conv_weight_grad",
)


def _check_choice(field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer; got {value!r}")


def _dtype(field: str, value: Any) -> jnp.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{field} must be a floating dtype (float32, bfloat16, float16); got {value!r}")
    return dtype


class BatchNorm(nnx.Module):
    """Batch normalisation (Ioffe and Szegedy 2015), after every convolution (Sec. 3.4).

    In training the statistics are those of the whole batch, or, with `group_size`, of each
    group of that many consecutive examples ("ghost" batch norm). The paper trained on 8 GPUs
    with 32 images each and normalised per GPU (Sec. 3.4); `group_size=32` reproduces that,
    and because each group lies on one device no cross-device reduction is needed. The running
    statistics move towards the mean over groups: running = momentum * running +
    (1 - momentum) * batch (Flax's convention; torch's momentum 0.1 is 0.9 here), the variance
    unbiased. Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, features: int, *, momentum: float, epsilon: float,
                 group_size: int | None, zero_init: bool, dtype: Any, param_dtype: Any):
        self.scale = nnx.Param(jnp.full((features,), 0.0 if zero_init else 1.0, param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.group_size = group_size
        self.dtype = dtype
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            batch, channels = x.shape[0], x.shape[-1]
            group = self.group_size or batch
            if batch % group:
                raise ValueError(f"bn_group_size={group} must divide the batch size {batch}")
            x32 = x32.reshape((batch // group, group) + x.shape[1:])
            axes = tuple(range(1, x32.ndim - 1))
            mean = x32.mean(axes, keepdims=True)
            var = jnp.square(x32 - mean).mean(axes, keepdims=True)
            # The running variance is the unbiased estimate, as Caffe's and torch's BN keep it.
            count = x32.size // x32.shape[0] // channels
            unbiased = var * (count / max(count - 1, 1))
            keep = self.momentum
            self.mean[...] = keep * self.mean[...] + (1 - keep) * mean.reshape(-1, channels).mean(0)
            self.var[...] = keep * self.var[...] + (1 - keep) * unbiased.reshape(-1, channels).mean(0)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y.reshape(x.shape) * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class Layers:
    """Makes every convolution and BN of a network, with the options they all share.

    Convolutions have no bias (BN follows each) and symmetric padding of (k - 1) // 2, as the
    paper's Caffe models and torchvision: "SAME" padding would pad asymmetrically at stride 2
    and shift every feature map by one pixel against converted weights. Their kernels are
    initialised as the paper's reference [13] (He et al. 2015, "Delving Deep into Rectifiers",
    Eq. 10): a zero-mean Gaussian of standard deviation sqrt(2 / n), with n = k * k * (input
    channels) ("fan_in", [13]'s forward case and Caffe's MSRA filler) or k * k * (output
    channels) ("fan_out", [13]'s backward case, torchvision's choice).
    """

    bn_momentum: float
    bn_epsilon: float
    bn_group_size: int | None
    dtype: Any
    param_dtype: Any
    init_fan: str
    conv_weight_grad: str = "xla"

    def conv(self, in_features: int, out_features: int, size: int, stride: int,
             rngs: nnx.Rngs) -> nnx.Conv:
        pad = (size - 1) // 2
        return nnx.Conv(
            in_features, out_features, (size, size), (stride, stride),
            padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=jax.nn.initializers.variance_scaling(2.0, self.init_fan, "normal"),
            conv_general_dilated=(conv.conv_general_dilated if self.conv_weight_grad == "matmul"
                                  else jax.lax.conv_general_dilated),
            rngs=rngs)

    def bn(self, features: int, zero_init: bool = False) -> BatchNorm:
        return BatchNorm(features, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                         group_size=self.bn_group_size, zero_init=zero_init, dtype=self.dtype,
                         param_dtype=self.param_dtype)


def zero_padding_shortcut(x: jax.Array, out_features: int, stride: int) -> jax.Array:
    """Option A (Sec. 3.3): the identity, subsampled by the stride, with zero channels appended.

    It has no parameters; the appended channels are exactly zero.
    """
    x = x[:, ::stride, ::stride, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, out_features - x.shape[-1])))


class Projection(nnx.Module):
    """Options B and C (Sec. 3.3, Eq. 2): W_s x, a 1x1 convolution with the block's stride, then BN."""

    def __init__(self, in_features: int, out_features: int, stride: int, layers: Layers,
                 rngs: nnx.Rngs):
        self.conv = layers.conv(in_features, out_features, 1, stride, rngs)
        self.bn = layers.bn(out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class Block(nnx.Module):
    """A building block, y = relu(F(x) + shortcut(x)) (Sec. 3.2, Eq. 1 and 2, Fig. 2).

    The shortcut: option A pads with zeros where the shape changes; option B projects only there
    and is the identity elsewhere; option C projects in every block. A plain block
    (`residual=False`, Sec. 4.1 "Plain Networks") is relu(F(x)): no shortcut, no addition.
    Subclasses make the layers of F and define `branch`.
    """

    def _init_shortcut(self, in_features: int, out_features: int, stride: int, shortcut: str,
                       residual: bool, layers: Layers, rngs: nnx.Rngs) -> None:
        self.residual = residual
        self.stride = stride
        self.out_features = out_features
        reshapes = stride != 1 or in_features != out_features
        projects = residual and (shortcut == "C" or (shortcut == "B" and reshapes))
        self.projection = Projection(in_features, out_features, stride, layers, rngs) if projects else None

    def branch(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def shortcut(self, x: jax.Array) -> jax.Array:
        if self.projection is not None:
            return self.projection(x)
        return zero_padding_shortcut(x, self.out_features, self.stride)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.branch(x)
        if self.residual:
            y = y + self.shortcut(x)
        return nnx.relu(y)


class BasicBlock(Block):
    """Two 3x3 convolutions (Fig. 5 left): ResNet-18/34 and the CIFAR networks.

    The stride of a down-sampling block is on the first 3x3 convolution.
    """

    expansion = 1

    def __init__(self, in_features: int, filters: int, stride: int, *, shortcut: str,
                 residual: bool, zero_init_residual: bool, stride_on: str, layers: Layers,
                 rngs: nnx.Rngs):
        del stride_on  # one place for the stride only
        self.conv1 = layers.conv(in_features, filters, 3, stride, rngs)
        self.bn1 = layers.bn(filters)
        self.conv2 = layers.conv(filters, filters, 3, 1, rngs)
        self.bn2 = layers.bn(filters, zero_init=zero_init_residual)
        self._init_shortcut(in_features, filters, stride, shortcut, residual, layers, rngs)

    def branch(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(x))


class BottleneckBlock(Block):
    """1x1 (reduce), 3x3, 1x1 (restore, 4x the filters) convolutions (Fig. 5 right): ResNet-50 and up.

    `stride_on="1x1"` puts a down-sampling block's stride on the first 1x1 convolution, as the
    paper's models (Sec. 3.3, "performed by conv3_1, conv4_1, and conv5_1 with a stride of 2");
    `"3x3"` puts it on the 3x3 convolution ("ResNet v1.5", as torchvision), which costs more
    multiply-adds and changes no parameter.
    """

    expansion = 4

    def __init__(self, in_features: int, filters: int, stride: int, *, shortcut: str,
                 residual: bool, zero_init_residual: bool, stride_on: str, layers: Layers,
                 rngs: nnx.Rngs):
        stride_1x1, stride_3x3 = (stride, 1) if stride_on == "1x1" else (1, stride)
        out_features = filters * self.expansion
        self.conv1 = layers.conv(in_features, filters, 1, stride_1x1, rngs)
        self.bn1 = layers.bn(filters)
        self.conv2 = layers.conv(filters, filters, 3, stride_3x3, rngs)
        self.bn2 = layers.bn(filters)
        self.conv3 = layers.conv(filters, out_features, 1, 1, rngs)
        self.bn3 = layers.bn(out_features, zero_init=zero_init_residual)
        self._init_shortcut(in_features, out_features, stride, shortcut, residual, layers, rngs)

    def branch(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


def _run_block(block: nnx.Module, x: jax.Array, remat: bool) -> jax.Array:
    """block(x), under `jax.checkpoint` where `remat`: its activations are recomputed in the
    backward pass instead of kept. BN's running statistics are updated as without it."""
    if not remat:
        return block(x)
    graphdef, state = nnx.split(block)

    def forward(state, x):
        copy = nnx.merge(graphdef, state)
        return copy(x), nnx.state(copy, nnx.BatchStat)

    y, stats = jax.checkpoint(forward)(state, x)
    nnx.update(block, stats)
    return y


class ScannedBlocks(nnx.Module):
    """`length` identical blocks as one: every variable of `block` is stacked on a leading axis of
    that length, and `jax.lax.scan` runs the block once per slice.

    One block is traced, lowered and compiled instead of `length` (the compile time of deep
    networks: ResNet-152's third stage has 35 identical blocks). `ScannedBlocks.stack(blocks)`
    makes one from blocks built one by one, so a scanned network has the same weights as the
    unrolled one made from the same seed; `unstack()` gives the blocks back.
    """

    def __init__(self, block: Block, length: int, remat: bool = False):
        self.block = block
        self.length = length
        self.remat = remat

    @classmethod
    def stack(cls, blocks: list[Block], remat: bool = False) -> "ScannedBlocks":
        graphdef, first = nnx.split(blocks[0])
        stacked = jax.tree.map(lambda *values: jnp.stack(values), first,
                               *(nnx.state(b) for b in blocks[1:]))
        return cls(nnx.merge(graphdef, stacked), len(blocks), remat)

    def unstack(self) -> list[Block]:
        graphdef, state = nnx.split(self.block)
        return [nnx.merge(graphdef, jax.tree.map(lambda v, i=i: v[i], state))
                for i in range(self.length)]

    def __call__(self, x: jax.Array) -> jax.Array:
        graphdef, state = nnx.split(self.block)

        def body(x, state):
            block = nnx.merge(graphdef, state)
            return _run_block(block, x, self.remat), nnx.state(block, nnx.BatchStat)

        x, stats = jax.lax.scan(body, x, state)
        nnx.update(self.block, stats)
        return x


class ResNet(nnx.Module):
    """A residual network, or its plain twin, built from a table of stage sizes.

    stem="imagenet" (Table 1): conv1, a 7x7/2 convolution with `width` filters, BN, ReLU, and a
    3x3/2 max-pool; stem="cifar" (Sec. 4.2): a 3x3 convolution with `width` filters, BN, ReLU.
    Then one stage per entry of `stage_sizes`; stage i has width * 2**i filters (x4 out for
    bottleneck blocks) and all but the first halve the map in their first block. Global average
    pooling and a fully connected classifier end the network.

    Options:
      shortcut: "A", "B" or "C" (Sec. 3.3). residual: False gives the plain network.
      stride_on: "1x1" (the paper) or "3x3" (v1.5, torchvision), bottleneck blocks only.
      zero_init_residual: start each block's last BN scale at 0, so that every residual block
        starts as the identity (Goyal et al. 2017; a later practice, not the paper's).
      bn_momentum, bn_epsilon, bn_group_size: see `BatchNorm`.
      dtype: compute dtype; param_dtype: parameter dtype. Logits are float32.
      init_fan: "fan_in" or "fan_out", see `Layers`. The classifier keeps Flax's default init
        (LeCun normal), as the paper says nothing of it.
      scan_blocks: run the blocks of each stage after the first (all alike: same shapes, no
        stride) as one `ScannedBlocks`, parameters stacked. The compiler then sees one block per
        stage instead of up to 35, which cuts compile time on accelerators. Off by default:
        XLA's CPU backend runs the weight gradients of convolutions inside a scan far slower
        than unrolled. The same seed gives the same weights either way; `convert.transfer`
        moves weights between the layouts.
      remat: rematerialise each block (`jax.checkpoint`): its activations are recomputed in the
        backward pass instead of kept, which cuts peak training memory for about one more
        forward pass of compute. Outputs and gradients are unchanged.
      conv_weight_grad: how the kernel gradients of the convolutions are computed: "xla" (XLA's
        own), "matmul" (one matrix product per kernel tap, `resnet_jax.conv`: several times
        faster on XLA's CPU backend), or "auto", "matmul" when the default backend is the CPU
        at construction and "xla" elsewhere. Outputs and gradients are the same either way.
    """

    def __init__(self, stage_sizes: tuple[int, ...], *, block: str, stem: str, num_classes: int,
                 rngs: nnx.Rngs, width: int = 64, shortcut: str = "B", residual: bool = True,
                 stride_on: str = "1x1", zero_init_residual: bool = False,
                 bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                 bn_group_size: int | None = None, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, init_fan: str = "fan_in", in_channels: int = 3,
                 scan_blocks: bool = False, remat: bool = False, conv_weight_grad: str = "auto"):
        _check_choice("block", block, tuple(BLOCKS))
        _check_choice("stem", stem, STEMS)
        _check_choice("shortcut", shortcut, SHORTCUTS)
        _check_choice("stride_on", stride_on, STRIDE_ON)
        _check_choice("init_fan", init_fan, INIT_FANS)
        _check_choice("conv_weight_grad", conv_weight_grad, CONV_WEIGHT_GRADS)
        if conv_weight_grad == "auto":
            conv_weight_grad = "matmul" if jax.default_backend() == "cpu" else "xla"
        for field, value in [("num_classes", num_classes), ("width", width),
                             ("in_channels", in_channels), *(("stage_sizes", n) for n in stage_sizes)]:
            _check_positive_int(field, value)
        if bn_group_size is not None:
            _check_positive_int("bn_group_size", bn_group_size)
        if not 0.0 <= bn_momentum < 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1); got {bn_momentum!r}")
        if not bn_epsilon > 0.0:
            raise ValueError(f"bn_epsilon must be positive; got {bn_epsilon!r}")
        for field, value in [("scan_blocks", scan_blocks), ("remat", remat)]:
            if not isinstance(value, bool):
                raise ValueError(f"{field} must be True or False; got {value!r}")
        layers = Layers(bn_momentum, bn_epsilon, bn_group_size, _dtype("dtype", dtype),
                        _dtype("param_dtype", param_dtype), init_fan, conv_weight_grad)

        self.in_channels = in_channels
        self.dtype = layers.dtype
        self.scan_blocks = scan_blocks
        self.remat = remat
        self.max_pool = stem == "imagenet"
        self.conv1 = layers.conv(in_channels, width, 7 if self.max_pool else 3,
                                 2 if self.max_pool else 1, rngs)
        self.bn1 = layers.bn(width)
        block_class = BLOCKS[block]
        features = width
        self.stages = nnx.List()
        for i, size in enumerate(stage_sizes):
            filters = width * 2**i
            stage = nnx.List()
            for j in range(size):
                stage.append(block_class(
                    features, filters, 2 if i > 0 and j == 0 else 1, shortcut=shortcut,
                    residual=residual, zero_init_residual=zero_init_residual,
                    stride_on=stride_on, layers=layers, rngs=rngs))
                features = filters * block_class.expansion
            if scan_blocks and len(stage) > 2:  # a scan of one block would gain nothing
                stage = nnx.List([stage[0], ScannedBlocks.stack(list(stage[1:]), remat)])
            self.stages.append(stage)
        self.fc = nnx.Linear(features, num_classes, dtype=layers.dtype,
                             param_dtype=layers.param_dtype, rngs=rngs)

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"input must be a batch of images, NHWC (rank 4); got shape {tuple(x.shape)}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"input must have in_channels={self.in_channels} channels (NHWC, last "
                             f"axis); got shape {tuple(x.shape)}")

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Feature maps for users who build on the backbone (detection, segmentation).

        "stem": conv1 after BN and ReLU (stride 2 for ImageNet, before the max-pool);
        "stage1".."stageN": each stage's output (for ImageNet, Table 1's conv2_x..conv5_x at
        strides 4, 8, 16, 32); "pooled": the globally average-pooled vector before the classifier.
        """
        self._check_input(x)
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        maps = {"stem": x}
        if self.max_pool:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, stage in enumerate(self.stages, 1):
            for block in stage:
                x = block(x) if isinstance(block, ScannedBlocks) else _run_block(block, x, self.remat)
            maps[f"stage{i}"] = x
        maps["pooled"] = x.mean(axis=(1, 2))
        return maps

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(self.features(x)["pooled"]).astype(jnp.float32)


def create(name: str, *, num_classes: int, rngs: nnx.Rngs, **overrides: Any) -> ResNet:
    """The network called `name` (see NAMES), with the paper's choices unless overridden.

    ImageNet networks (Table 1) default to option B shortcuts (the paper's choice for the deeper
    nets, Sec. 3.3 and Table 3) and the stride on the 1x1 convolution; CIFAR networks (Sec. 4.2)
    have 6n + 2 weighted layers, 16/32/64 filters and option A shortcuts. Plain networks are the
    same stacks with no shortcut. `overrides` are any of OPTIONS (see `ResNet`).
    """
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"unknown model name {name!r}; known: {NAMES}")
    family, depth = match.group(1), int(match.group(2))
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option {unknown[0]!r}; known: {', '.join(OPTIONS)}")
    if family.startswith("cifar"):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, "
                             f"1202, ...); got {depth} in {name!r}")
        n = (depth - 2) // 6
        defaults = dict(stage_sizes=(n, n, n), block="basic", stem="cifar", width=16, shortcut="A")
    else:
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"ImageNet depth must be one of {', '.join(map(str, IMAGENET_DEPTHS))}; "
                             f"got {depth} in {name!r}")
        stage_sizes, block = IMAGENET_DEPTHS[depth]
        defaults = dict(stage_sizes=stage_sizes, block=block, stem="imagenet", width=64, shortcut="B")
    return ResNet(**{**defaults, **overrides}, residual=not family.endswith("plain"),
                  num_classes=num_classes, rngs=rngs)
