"""Deep residual networks and their plain twins as Flax NNX modules.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385):
the ImageNet networks of Table 1, the CIFAR-10 networks of Sec. 4.2, the shortcut options A, B
and C of Sec. 3.3, and the plain networks of Table 2 and Fig. 6. The variants that later papers
test: pre-activation blocks and bottleneck CIFAR networks (He et al. 2016, "Identity Mappings
in Deep Residual Networks"), the block orders of Gross and Wilber 2016, highway gates
(Srivastava et al. 2015), and lesioned blocks (Veit et al. 2016); `create` also makes the VGG
baselines of Sec. 3.3 and Table 3 (`resnet_jax.vgg`).

    model = create("resnet50", num_classes=1000, rngs=nnx.Rngs(0), stride_on="3x3")
    logits = model(images)              # NHWC; model.train() / model.eval() switch BN
    maps = model.features(images)       # "stem", "stage1".., "pooled"

`scan_blocks=True` runs the identical blocks of each stage as one scanned block and
`remat=True` recomputes each block's activations in the backward pass (see `ResNet`).
`blocks(model)` lists the blocks in depth order; `block.lesioned = True` deletes a residual
branch (see `Block`).
"""

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax import cpu, vgg
from resnet_jax.layers import (BN_STATISTICS, BatchNorm, Layers, check_choice,  # noqa: F401
                               check_images, check_positive_int, classifier, make_layers)

SHORTCUTS = ("A", "B", "C")
STRIDE_ON = ("1x1", "3x3")
STEMS = ("imagenet", "cifar")
BLOCK_ORDERS = ("post", "pre", "no_final_relu", "bn_after_add")
GATES = ("none", "highway")

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
    "cifar_resnet{6n+2}, cifar_plain{6n+2} (e.g. cifar_resnet20, cifar_plain56; 9n+2 with "
    "block='bottleneck'), vgg16, vgg19, vgg16_bn, vgg19_bn"
)
_NAME = re.compile(r"(resnet|plain|cifar_resnet|cifar_plain)(\d+)")
_VGG_NAME = re.compile(r"vgg(16|19)(_bn)?")

# What `create` lets a caller change; the name fixes the rest (depth, block kind, stem).
OPTIONS = (
    "block", "shortcut", "stride_on", "block_order", "gate", "gate_bias", "zero_init_residual",
    "bn_momentum", "bn_epsilon", "bn_group_size", "dtype", "param_dtype", "width", "init_fan",
    "in_channels", "scan_blocks", "remat", "conv_weight_grad", "drop_path_rate",
)


def zero_padding_shortcut(x: jax.Array, out_features: int, stride: int) -> jax.Array:
    """Option A (Sec. 3.3): the identity, subsampled by the stride, with zero channels appended.

    It has no parameters; the appended channels are exactly zero.
    """
    x = x[:, ::stride, ::stride, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, out_features - x.shape[-1])))


class Projection(nnx.Module):
    """Options B and C (Sec. 3.3, Eq. 2): W_s x, a 1x1 convolution with the block's stride, then BN.

    Pre-activation blocks project without a BN (`normalise=False`), as He et al. 2016's code:
    the sum it joins is normalised by the next block's pre-activation.
    """

    def __init__(self, in_features: int, out_features: int, stride: int, layers: Layers,
                 rngs: nnx.Rngs, normalise: bool = True):
        self.conv = layers.conv(in_features, out_features, 1, stride, rngs)
        self.bn = layers.bn(out_features) if normalise else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        return x if self.bn is None else self.bn(x)


class HighwayGate(nnx.Module):
    """The transform gate of highway networks (Srivastava, Greff and Schmidhuber 2015, Sec. 2),
    T(x) = sigmoid(W_T x + b_T), here a 1x1 convolution of the block's input with the block's
    stride and output channels, so that it matches F(x) and the shortcut at every position and
    channel (He et al. 2016, "Identity Mappings", Sec. 3.1, "exclusive gating", Fig. 2c).

    b_T starts at `bias`; a negative one makes a new block mostly carry its shortcut
    (Srivastava et al., Sec. 2.2).
    """

    def __init__(self, in_features: int, out_features: int, stride: int, bias: float,
                 layers: Layers, rngs: nnx.Rngs):
        self.conv = layers.conv(in_features, out_features, 1, stride, rngs, bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.conv(x))


class Block(nnx.Module):
    """A building block, y = relu(F(x) + shortcut(x)) (Sec. 3.2, Eq. 1 and 2, Fig. 2).

    The shortcut: option A pads with zeros where the shape changes; option B projects only there
    and is the identity elsewhere; option C projects in every block. A plain block
    (`residual=False`, Sec. 4.1 "Plain Networks") is relu(F(x)): no shortcut, no addition.
    Subclasses give the convolutions of F (`convolutions`); this class orders them with BN and
    ReLU as `order` says (see `block_order` in `ResNet`):

      post            conv-BN-ReLU ... conv-BN, add, ReLU                 (the paper, Fig. 2)
      pre             BN-ReLU-conv ... BN-ReLU-conv, add                  (He et al. 2016)
      no_final_relu   conv-BN-ReLU ... conv-BN, add                       (Gross and Wilber 2016)
      bn_after_add    conv-BN-ReLU ... conv, add, BN, ReLU                (Gross and Wilber 2016)

    In "pre", the first block of each stage (`opens_stage`) and every block whose shortcut
    projects share their first BN-ReLU between the branch and the shortcut: "for the first
    Residual Unit ... we adopt the first activation right after conv1 and before splitting into
    two paths" (He et al. 2016, Sec. 4.1; their code does so at the first block of every stage,
    whatever the shortcut). The other blocks' identity shortcuts carry the raw input, so that the
    path of identities from block to block within a stage holds nothing else.
    `preactivated=True` (the first block after the stem, which ends in BN-ReLU) leaves out the
    block's first BN-ReLU, as that code does. A plain "pre" block is F(x) alone: stacked,
    BN-ReLU-conv layers.

    With `gate` (a `HighwayGate`), the addition is T(x) F(x) + (1 - T(x)) shortcut(x), T read
    off the block's input x as it arrives (in "pre", before its BN-ReLU).

    `drop_path` > 0 (stochastic depth, Huang et al. 2016, "Deep Networks with Stochastic Depth"):
    in training, each example's F(x) is dropped with that probability and kept scaled by
    1 / (1 - drop_path), so that its expectation is F(x); at evaluation (`model.eval()`) F(x)
    always. The draws come from the block's own random stream, kept with BN's statistics.

    `lesioned` (a plain attribute, not a parameter; Veit, Wilber and Belongie 2016) deletes the
    residual branch: the block computes only what its order applies to the shortcut after the
    addition, e.g. relu(shortcut(x)) in "post"; the gate goes with the branch. A lesioned plain
    block is the identity, which only a block that keeps the shape of its input can be.
    """

    expansion = 1

    def __init__(self, in_features: int, filters: int, stride: int, *, shortcut: str,
                 residual: bool, zero_init_residual: bool, stride_on: str, layers: Layers,
                 rngs: nnx.Rngs, order: str = "post", gate: str = "none",
                 gate_bias: float = -2.0, preactivated: bool = False, opens_stage: bool = False,
                 drop_path: float = 0.0, drop_path_rngs: nnx.Rngs | None = None):
        shapes = self.convolutions(in_features, filters, stride, stride_on)
        self.depth = len(shapes)
        for k, (cin, cout, size, conv_stride) in enumerate(shapes, 1):
            setattr(self, f"conv{k}", layers.conv(cin, cout, size, conv_stride, rngs))
            if order == "pre":  # each BN normalises its convolution's input
                bn = None if k == 1 and preactivated else layers.bn(cin)
            else:
                bn = layers.bn(cout, zero_init=k == self.depth and zero_init_residual)
            setattr(self, f"bn{k}", bn)
        out_features = shapes[-1][1]
        self.residual = residual
        self.order = order
        self.stride = stride
        self.in_features = in_features
        self.out_features = out_features
        self.lesioned = False
        self.opens_stage = opens_stage
        projects = residual and (shortcut == "C" or (shortcut == "B" and self.reshapes))
        self.projection = (Projection(in_features, out_features, stride, layers, rngs,
                                      normalise=order != "pre") if projects else None)
        self.gate = (HighwayGate(in_features, out_features, stride, gate_bias, layers, rngs)
                     if gate == "highway" else None)
        # One mask value per example (broadcast over H, W, C).
        self.drop_path = (nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rng_collection="drop_path",
                                      rngs=drop_path_rngs) if drop_path > 0 else None)

    def convolutions(self, in_features: int, filters: int, stride: int,
                     stride_on: str) -> list[tuple[int, int, int, int]]:
        """(input channels, output channels, kernel size, stride) of each convolution of F."""
        raise NotImplementedError

    @property
    def reshapes(self) -> bool:
        """Whether the output's shape differs from the input's (down-sampling or widening)."""
        return self.stride != 1 or self.in_features != self.out_features

    def _preactivate(self, x: jax.Array) -> jax.Array:
        return x if self.bn1 is None else nnx.relu(self.bn1(x))

    def branch(self, x: jax.Array) -> jax.Array:
        """F(x). In "pre", x is the pre-activated input (after the first BN-ReLU); in
        "bn_after_add", F ends at its last convolution (its BN follows the addition)."""
        for k in range(1, self.depth + 1):
            conv, bn = getattr(self, f"conv{k}"), getattr(self, f"bn{k}")
            if self.order == "pre":
                x = conv(x if k == 1 else nnx.relu(bn(x)))
            else:
                x = conv(x)
                if k < self.depth:
                    x = nnx.relu(bn(x))
                elif self.order != "bn_after_add":
                    x = bn(x)
        return x

    def shortcut(self, x: jax.Array) -> jax.Array:
        """The projection of x, else option A's padded identity of x."""
        if self.projection is not None:
            return self.projection(x)
        return zero_padding_shortcut(x, self.out_features, self.stride)

    def _shortcut_input(self, x: jax.Array, inner: jax.Array) -> jax.Array:
        """What the shortcut reads: in "pre", the shared pre-activation where there is one."""
        shared = self.order == "pre" and (self.opens_stage or self.projection is not None)
        return inner if shared else x

    def after_addition(self, y: jax.Array) -> jax.Array:
        """What the order applies to the sum (or the gated mix) of branch and shortcut."""
        if self.order == "post":
            return nnx.relu(y)
        if self.order == "bn_after_add":
            return nnx.relu(getattr(self, f"bn{self.depth}")(y))
        return y  # "pre" and "no_final_relu": nothing on the identity path

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.lesioned:
            return self._lesioned(x)
        pre = self.order == "pre"
        inner = self._preactivate(x) if pre else x
        y = self.branch(inner)
        if not self.residual:
            return y if pre else nnx.relu(y)
        if self.drop_path is not None:
            y = self.drop_path(y)
        carried = self.shortcut(self._shortcut_input(x, inner))
        if self.gate is not None:
            transform = self.gate(x)
            y = transform * y + (1 - transform) * carried
        else:
            y = y + carried
        return self.after_addition(y)

    def _lesioned(self, x: jax.Array) -> jax.Array:
        if not self.residual:
            if self.reshapes:
                raise ValueError(
                    f"a lesioned plain block is the identity, and this one changes the shape "
                    f"({self.in_features} -> {self.out_features} channels, stride {self.stride}): "
                    f"a plain network has no shortcut to keep")
            return x
        # A shared pre-activation stays with the shortcut.
        inner = self._preactivate(x) if self.order == "pre" else x
        return self.after_addition(self.shortcut(self._shortcut_input(x, inner)))


class BasicBlock(Block):
    """Two 3x3 convolutions (Fig. 5 left): ResNet-18/34 and the CIFAR networks.

    The stride of a down-sampling block is on the first 3x3 convolution.
    """

    expansion = 1

    def convolutions(self, in_features, filters, stride, stride_on):
        del stride_on  # one place for the stride only
        return [(in_features, filters, 3, stride), (filters, filters, 3, 1)]


class BottleneckBlock(Block):
    """1x1 (reduce), 3x3, 1x1 (restore, 4x the filters) convolutions (Fig. 5 right): ResNet-50 and up.

    `stride_on="1x1"` puts a down-sampling block's stride on the first 1x1 convolution, as the
    paper's models (Sec. 3.3, "performed by conv3_1, conv4_1, and conv5_1 with a stride of 2");
    `"3x3"` puts it on the 3x3 convolution ("ResNet v1.5", as torchvision), which costs more
    multiply-adds and changes no parameter.
    """

    expansion = 4

    def convolutions(self, in_features, filters, stride, stride_on):
        stride_1x1, stride_3x3 = (stride, 1) if stride_on == "1x1" else (1, stride)
        return [(in_features, filters, 1, stride_1x1), (filters, filters, 3, stride_3x3),
                (filters, filters * self.expansion, 1, 1)]


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


def _run_block(block: nnx.Module, x: jax.Array, remat: bool) -> jax.Array:
    """block(x); where `remat`, its activations are recomputed in the backward pass instead of
    kept (`rematerialised`). BN's running statistics are updated as without it.

    Traced without remat, the block runs as one jitted function of its variables: blocks that
    differ in nothing but their values (all but the first of a stage) share it, so JAX traces,
    differentiates and lowers a stage's opening block and one of the rest, not every block; XLA
    inlines the calls.
    Called eagerly it runs as itself, so that tools that watch its calls see arrays
    (`resnet_jax.analysis`).
    """
    if not remat and not isinstance(x, jax.core.Tracer):
        return block(x)
    graphdef, state = nnx.split(block)
    run = _rematerialised(functools.partial(_block_forward, graphdef)) if remat else \
        functools.partial(_block_forward_jit, graphdef)
    y, stats = run(state, x)
    nnx.update(block, stats)
    return y


def _rematerialised(forward):
    """`forward(state, x) -> (y, aux)` keeping for the backward pass only its inputs and each
    BN's batch statistics (per channel: a few kilobytes), recomputing the rest there. With the
    statistics kept, the recomputation needs nothing from other devices: remat adds no
    collective. `jax.checkpoint`, except on XLA's CPU backend, whose passes undo it
    (`cpu.rematerialised`, which recomputes the statistics too)."""
    if cpu.in_use():
        return cpu.rematerialised(forward)
    return jax.checkpoint(forward, policy=jax.checkpoint_policies.save_only_these_names(BN_STATISTICS))


def _block_forward(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array):
    """The block's output and its variables other than parameters after the call: BN's
    statistics, and the random stream of its drop path where it has one."""
    copy = nnx.merge(graphdef, state)
    return copy(x), nnx.state(copy, nnx.Not(nnx.Param))


_block_forward_jit = jax.jit(_block_forward, static_argnums=0)


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
      block_order: where BN and ReLU sit around the convolutions and the addition (`Block`):
        "post" (the paper, Fig. 2); "pre", full pre-activation (He, Zhang, Ren and Sun 2016,
        "Identity Mappings in Deep Residual Networks", Fig. 1b and 4e); "no_final_relu" and
        "bn_after_add", the variants of Gross and Wilber 2016 ("Training and investigating
        Residual Nets"), the latter of which they found to hurt. In "pre" a BN-ReLU follows the
        last stage (before pooling); the CIFAR stem is its convolution alone, since the first
        block pre-activates, and the ImageNet stem keeps BN-ReLU and the max-pool while the
        first block leaves out its own first BN-ReLU (the Torch code of He et al. 2016,
        fb.resnet.torch's preresnet). Plain networks take "post" (conv-BN-ReLU layers) or
        "pre" (BN-ReLU-conv layers, with the final BN-ReLU); the other two change only what
        follows an addition, which plain networks lack.
      gate: "none", or "highway": each residual block computes T(x) F(x) + (1 - T(x)) s(x),
        T a `HighwayGate` (Srivastava et al. 2015; He et al. 2016's "exclusive gating"), then
        what its order applies after the addition. Residual networks only.
      gate_bias: the initial bias of every gate; -2.0 (T about 0.12: a new block mostly carries
        its shortcut, as Srivastava et al., Sec. 2.2, advise with "-1, -3 etc.").
      zero_init_residual: start each block's last BN scale at 0, so that every residual block
        starts as the identity (Goyal et al. 2017; a later practice, not the paper's). Not with
        "pre" (the branch ends in a convolution) or "bn_after_add" (the BN follows the sum).
      bn_momentum, bn_epsilon, bn_group_size: see `BatchNorm`.
      dtype: compute dtype: "auto" (bfloat16 on GPUs and TPUs, float32 on the CPU; see
        `layers.compute_dtype`), "float32" or "bfloat16"; param_dtype: parameter dtype. The
        pooled features, the classifier (at HIGHEST precision) and the logits are float32, and
        in bfloat16 the convolutions' kernel gradients too (`layers.mixed_conv`).
      init_fan: "fan_in" or "fan_out", see `Layers`. The classifier keeps Flax's default init
        (LeCun normal), as the paper says nothing of it.
      scan_blocks: run the blocks of each stage after the first (all alike: same shapes, no
        stride) as one `ScannedBlocks`, parameters stacked. The compiler then sees one block per
        stage instead of up to 35, which cuts compile time. Off by default, so that default
        checkpoints keep one variable per layer: XLA's CPU backend runs its own kernel
        gradients (`conv_weight_grad="xla"`) far slower inside a scan; with the matmul ones
        (the CPU default) the scanned step is faster on CPU too (benchmarks/README.md). The
        same seed gives the same weights either way; `convert.transfer` moves weights between
        the layouts.
      remat: rematerialise each block (`_rematerialised`): its activations are recomputed in
        the backward pass instead of kept, which cuts peak training memory for about one more
        forward pass of compute. Outputs and gradients are unchanged; `jax.jvp` of the model is
        not defined with it.
      drop_path_rate: stochastic depth (Huang et al. 2016; `Block`), not in the paper: block l of
        the L in the network drops its branch with probability drop_path_rate x l / (L - 1),
        from 0 at the first block to drop_path_rate at the last, as timm's ResNet (ResNet strikes
        back: 0.05). Residual networks only; not with `scan_blocks` (the rates differ by block).
      conv_weight_grad: how the kernel gradients of the convolutions are computed: "xla" (XLA's
        own), "matmul" (one matrix product per kernel tap, `resnet_jax.cpu`: several times
        faster on XLA's CPU backend), or "auto", "matmul" when the default backend is the CPU
        at construction and "xla" elsewhere. Outputs and gradients are the same either way.
    """

    def __init__(self, stage_sizes: tuple[int, ...], *, block: str, stem: str, num_classes: int,
                 rngs: nnx.Rngs, width: int = 64, shortcut: str = "B", residual: bool = True,
                 stride_on: str = "1x1", block_order: str = "post", gate: str = "none",
                 gate_bias: float = -2.0, zero_init_residual: bool = False,
                 bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                 bn_group_size: int | None = None, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, init_fan: str = "fan_in", in_channels: int = 3,
                 scan_blocks: bool = False, remat: bool = False, conv_weight_grad: str = "auto",
                 drop_path_rate: float = 0.0):
        check_choice("block", block, tuple(BLOCKS))
        check_choice("stem", stem, STEMS)
        check_choice("shortcut", shortcut, SHORTCUTS)
        check_choice("stride_on", stride_on, STRIDE_ON)
        check_choice("block_order", block_order, BLOCK_ORDERS)
        check_choice("gate", gate, GATES)
        if not residual and block_order not in ("post", "pre"):
            raise ValueError(f"block_order={block_order!r} changes what follows the addition, and "
                             f"plain networks have none: use 'post' or 'pre'")
        if not residual and gate != "none":
            raise ValueError(f"gate={gate!r} needs a residual network: a plain network has no "
                             f"shortcut to carry")
        if isinstance(gate_bias, bool) or not isinstance(gate_bias, (int, float)):
            raise ValueError(f"gate_bias must be a number; got {gate_bias!r}")
        if zero_init_residual and block_order in ("pre", "bn_after_add"):
            raise ValueError(f"zero_init_residual zeroes the BN that ends each branch, and "
                             f"block_order={block_order!r} has none there: use 'post' or "
                             f"'no_final_relu'")
        for field, value in [("num_classes", num_classes), ("width", width),
                             ("in_channels", in_channels), *(("stage_sizes", n) for n in stage_sizes)]:
            check_positive_int(field, value)
        for field, value in [("scan_blocks", scan_blocks), ("remat", remat)]:
            if not isinstance(value, bool):
                raise ValueError(f"{field} must be True or False; got {value!r}")
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) \
                or not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate!r}")
        if drop_path_rate and not residual:
            raise ValueError(f"drop_path_rate={drop_path_rate!r} drops residual branches, and a "
                             f"plain network has none: use 0")
        if drop_path_rate and scan_blocks:
            raise ValueError(f"drop_path_rate={drop_path_rate!r} gives each block a rate of its "
                             f"own, and a scanned stage runs its blocks as one: use scan_blocks=False")
        layers = make_layers(bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                             bn_group_size=bn_group_size, dtype=dtype, param_dtype=param_dtype,
                             init_fan=init_fan, conv_weight_grad=conv_weight_grad)

        pre = block_order == "pre"
        self.in_channels = in_channels
        self.dtype = layers.dtype
        self.scan_blocks = scan_blocks
        self.remat = remat
        self.block_order = block_order
        self.max_pool = stem == "imagenet"
        # Image size / size of the last maps: what an input must at least measure.
        self.total_stride = (4 if self.max_pool else 1) * 2 ** (len(stage_sizes) - 1)
        self.conv1 = layers.conv(in_channels, width, 7 if self.max_pool else 3,
                                 2 if self.max_pool else 1, rngs)
        self.bn1 = layers.bn(width)
        block_class = BLOCKS[block]
        features = width
        # Drop path draws from a stream of its own, so that its rate changes no initial weight.
        drop_path_rngs = (nnx.Rngs(drop_path=jax.random.fold_in(rngs["drop_path"].key[...], 1))
                          if drop_path_rate else None)
        depth = sum(stage_sizes)
        rates = iter(drop_path_rate * k / max(depth - 1, 1) for k in range(depth))
        self.stages = nnx.List()
        for i, size in enumerate(stage_sizes):
            filters = width * 2**i
            stage = nnx.List()
            for j in range(size):
                stage.append(block_class(
                    features, filters, 2 if i > 0 and j == 0 else 1, shortcut=shortcut,
                    residual=residual, zero_init_residual=zero_init_residual,
                    stride_on=stride_on, layers=layers, rngs=rngs, order=block_order, gate=gate,
                    gate_bias=float(gate_bias), preactivated=pre and i + j == 0, opens_stage=j == 0,
                    drop_path=next(rates), drop_path_rngs=drop_path_rngs))
                features = filters * block_class.expansion
            if scan_blocks and len(stage) > 2:  # a scan of one block would gain nothing
                stage = nnx.List([stage[0], ScannedBlocks.stack(list(stage[1:]), remat)])
            self.stages.append(stage)
        # Pre-activation: the sum that leaves the last block has not been normalised yet.
        self.bn_final = layers.bn(features) if pre else None
        # Float32 at HIGHEST precision whatever the compute dtype: the logits feed the softmax.
        self.fc = classifier(features, num_classes, layers.param_dtype, rngs)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Feature maps for users who build on the backbone (detection, segmentation).

        "stem": conv1 after BN and ReLU (stride 2 for ImageNet, before the max-pool);
        "stage1".."stageN": each stage's output (for ImageNet, Table 1's conv2_x..conv5_x at
        strides 4, 8, 16, 32); "pooled": the globally average-pooled vector before the
        classifier (in "pre", of the last stage after the final BN-ReLU).
        """
        check_images(x, self.in_channels)
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        maps = {"stem": x}
        if self.max_pool:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, stage in enumerate(self.stages, 1):
            for block in stage:
                x = block(x) if isinstance(block, ScannedBlocks) else _run_block(block, x, self.remat)
            maps[f"stage{i}"] = x
        if self.bn_final is not None:
            x = nnx.relu(self.bn_final(x))
        maps["pooled"] = x.astype(jnp.float32).mean(axis=(1, 2))
        return maps

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(self.features(x)["pooled"])


class BlockInfo(NamedTuple):
    name: str           # "stage2.0": stage (from 1, as `features`) and block (from 0)
    block: Block
    downsamples: bool   # halves the map (the first block of every stage but the first)
    reshapes: bool      # its output's shape differs from its input's (down-samples or widens)


def blocks(model: ResNet) -> list[BlockInfo]:
    """The blocks of an unscanned network in depth order, for tools that look at or change them
    one at a time (lesion studies: `info.block.lesioned = True`, Veit et al. 2016)."""
    if model.scan_blocks:
        raise ValueError("models.blocks needs an unscanned model (scan_blocks=False): a scanned "
                         "stage runs its blocks as one; create the model with scan_blocks=False "
                         "and copy the weights in with convert.transfer(scanned, unscanned)")
    return [BlockInfo(f"stage{i}.{j}", block, block.stride != 1, block.reshapes)
            for i, stage in enumerate(model.stages, 1) for j, block in enumerate(stage)]


def create(name: str, *, num_classes: int, rngs: nnx.Rngs, **overrides: Any) -> nnx.Module:
    """The network called `name` (see NAMES), with the paper's choices unless overridden.

    ImageNet networks (Table 1) default to option B shortcuts (the paper's choice for the deeper
    nets, Sec. 3.3 and Table 3) and the stride on the 1x1 convolution; CIFAR networks (Sec. 4.2)
    have 6n + 2 weighted layers, 16/32/64 filters and option A shortcuts. Plain networks are the
    same stacks with no shortcut. `overrides` are any of OPTIONS (see `ResNet`).

    `block="bottleneck"` gives the CIFAR networks of He et al. 2016 ("Identity Mappings",
    Sec. 4): three stages of n bottleneck blocks, 16/32/64 filters (x4 out), 9n + 2 weighted
    layers (ResNet-164: n = 18; ResNet-1001: n = 111). ImageNet networks take their block kind
    from Table 1. VGG networks (vgg16, vgg19, and with BN vgg16_bn, vgg19_bn) are
    `resnet_jax.vgg.VGG` and take `vgg.OPTIONS`.
    """
    if isinstance(name, str) and _VGG_NAME.fullmatch(name):
        return vgg.create(name, num_classes=num_classes, rngs=rngs, **overrides)
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"unknown model name {name!r}; known: {NAMES}")
    family, depth = match.group(1), int(match.group(2))
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option {unknown[0]!r}; known: {', '.join(OPTIONS)}")
    block = overrides.pop("block", None)
    if family.startswith("cifar"):
        block = "basic" if block is None else block
        check_choice("block", block, tuple(BLOCKS))
        layers_per_block = 2 if block == "basic" else 3
        n, rest = divmod(depth - 2, 3 * layers_per_block)
        if n < 1 or rest:
            examples = "8, 14, 20, 32, 44, 56, 110, 1202" if block == "basic" else "11, 20, 29, 164, 1001"
            raise ValueError(f"CIFAR depth with {block} blocks must be {3 * layers_per_block}n+2 "
                             f"with n >= 1 ({examples}, ...); got {depth} in {name!r}")
        defaults = dict(stage_sizes=(n, n, n), block=block, stem="cifar", width=16, shortcut="A")
    else:
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"ImageNet depth must be one of {', '.join(map(str, IMAGENET_DEPTHS))}; "
                             f"got {depth} in {name!r}")
        stage_sizes, kind = IMAGENET_DEPTHS[depth]
        if block not in (None, kind):
            raise ValueError(f"block of {name} is {kind!r} (Table 1); only CIFAR networks choose "
                             f"their block; got {block!r}")
        defaults = dict(stage_sizes=stage_sizes, block=kind, stem="imagenet", width=64, shortcut="B")
    return ResNet(**{**defaults, **overrides}, residual=not family.endswith("plain"),
                  num_classes=num_classes, rngs=rngs)
