"""VGG-16 and VGG-19 (Simonyan and Zisserman 2015, configurations D and E), with and without BN:
the baselines of He et al., Sec. 3.3 and Table 3, laid out as torchvision's `vgg16`, `vgg16_bn`,
`vgg19` and `vgg19_bn`, so that their weights convert (`resnet_jax.convert`).

    model = create("vgg16_bn", num_classes=1000, rngs=nnx.Rngs(0))

Five stacks of 3x3 convolutions (with biases; in the _bn variants BN before each ReLU), 64, 128,
256, 512 and 512 filters, each stack ending in a 2x2/2 max-pool; the maps are then average-pooled
to 7x7 as torch's AdaptiveAvgPool2d does (for 224x224 images they are 7x7 already; smaller
images have their maps replicated), flattened, and classified by 4096-4096-classes fully
connected layers, ReLU and dropout 0.5 after each of the two hidden ones. Dropout is active in
train mode only (`model.train()` / `model.eval()`) and draws from the model's "dropout" stream
(the `rngs` given, or their default stream).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax import initializers
from resnet_jax.layers import check_images, check_positive_int, classifier, make_layers

# Convolutions per stack: configuration D (16 weight layers) and E (19) of Simonyan and Zisserman.
STACKS = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
POOLED_SIZE = 7     # torchvision's AdaptiveAvgPool2d((7, 7))
HIDDEN = 4096
DROPOUT = 0.5
OPTIONS = ("width", "bn_momentum", "bn_epsilon", "bn_group_size", "dtype", "param_dtype",
           "init_fan", "in_channels", "conv_weight_grad")


def adaptive_average_pool(x: jax.Array, size: int) -> jax.Array:
    """torch.nn.AdaptiveAvgPool2d(size) on NHWC maps of any height and width.

    Output cell i averages the input rows floor(i * n / size) to ceil((i + 1) * n / size) - 1
    (torch's windows), and likewise for columns; an input smaller than `size` has its cells
    repeated. A window's mean is taken over rows, then over columns: every window of one output
    row has the same rows, so this is the mean over the rectangle. Slices and means only, so
    that no multiply-add is counted for it (`resnet_jax.flops`).
    """
    for axis in (1, 2):
        n = x.shape[axis]
        cells = [jax.lax.slice_in_dim(x, i * n // size, -(-(i + 1) * n // size), axis=axis)
                 .mean(axis, keepdims=True) for i in range(size)]
        x = jnp.concatenate(cells, axis)
    return x


class VGG(nnx.Module):
    """A VGG network: `stack_sizes` 3x3 convolutions per stack, then the classifier (module doc).

    Options (those of `models.ResNet` that apply): width (filters of the first stack, doubling
    per stack up to 8x; 64), bn_momentum, bn_epsilon, bn_group_size (the _bn variants),
    dtype, param_dtype, init_fan (the convolutions' He initialisation, see `layers.Layers`; their
    biases start at 0), in_channels, conv_weight_grad. The fully connected layers start as
    torchvision's and Simonyan and Zisserman's: weights N(0, 0.01^2), biases 0. The hidden ones
    compute in `dtype`; the classifier (fc3) and the logits are float32, at HIGHEST precision.
    """

    def __init__(self, stack_sizes: tuple[int, ...], *, batch_norm: bool, num_classes: int,
                 rngs: nnx.Rngs, width: int = 64, bn_momentum: float = 0.9,
                 bn_epsilon: float = 1e-5, bn_group_size: int | None = None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 init_fan: str = "fan_in", in_channels: int = 3, conv_weight_grad: str = "auto"):
        for field, value in [("num_classes", num_classes), ("width", width),
                             ("in_channels", in_channels), *(("stack_sizes", n) for n in stack_sizes)]:
            check_positive_int(field, value)
        layers = make_layers(bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                             bn_group_size=bn_group_size, dtype=dtype, param_dtype=param_dtype,
                             init_fan=init_fan, conv_weight_grad=conv_weight_grad)
        self.in_channels = in_channels
        self.dtype = layers.dtype
        self.stack_sizes = tuple(stack_sizes)
        self.total_stride = 2 ** len(stack_sizes)  # one 2x2/2 max-pool per stack
        self.convs = nnx.List()
        self.bns = nnx.List() if batch_norm else None
        features = in_channels
        for i, size in enumerate(stack_sizes):
            filters = width * 2 ** min(i, 3)
            for _ in range(size):
                self.convs.append(layers.conv(features, filters, 3, 1, rngs, bias=0.0))
                if batch_norm:
                    self.bns.append(layers.bn(filters))
                features = filters

        init = dict(kernel_init=initializers.normal(0.01), bias_init=initializers.constant(0.0))
        self.fc1 = layers.dense(features * POOLED_SIZE**2, HIDDEN, rngs, **init)
        self.fc2 = layers.dense(HIDDEN, HIDDEN, rngs, **init)
        # The classifier float32 at HIGHEST precision whatever the compute dtype, as the ResNets'.
        self.fc3 = classifier(HIDDEN, num_classes, layers.param_dtype, rngs, **init)
        self.dropout1 = nnx.Dropout(DROPOUT, rngs=rngs)
        self.dropout2 = nnx.Dropout(DROPOUT, rngs=rngs)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """"stage1".."stage5": each stack's output after its max-pool (strides 2 to 32);
        "pooled": the 7x7 average-pooled maps, flattened (height, width, channel), the
        classifier's input."""
        check_images(x, self.in_channels)
        if min(x.shape[1:3]) < self.total_stride:
            raise ValueError(f"VGG's {len(self.stack_sizes)} max-pools need images of at least "
                             f"{self.total_stride}x{self.total_stride}; got shape {tuple(x.shape)}")
        x = x.astype(self.dtype)
        maps = {}
        layer = 0
        for i, size in enumerate(self.stack_sizes, 1):
            for _ in range(size):
                x = self.convs[layer](x)
                if self.bns is not None:
                    x = self.bns[layer](x)
                x = nnx.relu(x)
                layer += 1
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))  # floors odd sizes, as torch's
            maps[f"stage{i}"] = x
        maps["pooled"] = adaptive_average_pool(x, POOLED_SIZE).reshape(x.shape[0], -1)
        return maps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.features(x)["pooled"]
        x = self.dropout1(nnx.relu(self.fc1(x)))
        x = self.dropout2(nnx.relu(self.fc2(x)))
        return self.fc3(x)


def create(name: str, *, num_classes: int, rngs: nnx.Rngs, **overrides: Any) -> VGG:
    """vgg16, vgg19, vgg16_bn or vgg19_bn; `overrides` are any of OPTIONS (see `VGG`)."""
    depth, _, norm = name.removeprefix("vgg").partition("_")
    if not depth.isdigit() or int(depth) not in STACKS or norm not in ("", "bn"):
        raise ValueError(f"unknown VGG name {name!r}; known: vgg16, vgg19, vgg16_bn, vgg19_bn")
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise ValueError(f"option {unknown[0]!r} does not apply to VGG networks ({name}); theirs: "
                         f"{', '.join(OPTIONS)}")
    return VGG(STACKS[int(depth)], batch_norm=norm == "bn", num_classes=num_classes, rngs=rngs,
               **overrides)
