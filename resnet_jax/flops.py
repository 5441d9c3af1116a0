"""Parameter and multiply-add counts, as the paper's Table 1 counts "FLOPs".

Multiply-adds are those of the convolutions and fully connected layers of one forward pass of
one image; BN, ReLU, pooling and additions are not counted (the paper's and torchvision's
convention). They are read off the shapes of the traced forward pass, so they hold for every
option of every network (stride placement, projections, scanned stages) without a formula per
architecture; nothing is run.
"""

import collections
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (BN's scale and bias included, its running statistics not)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count_macs(model: nnx.Module, image_size: int | tuple[int, int] = 224) -> int:
    """Multiply-adds of one forward pass of one image of `image_size` (an int or (height, width)).

    The model is traced in eval mode on a copy, so `model` is left as it was; an abstract model
    (`nnx.eval_shape`) works as well as a real one.
    """
    return sum(macs_by_kind(model, image_size).values())


def macs_by_kind(model: nnx.Module, image_size: int | tuple[int, int] = 224) -> dict[str, int]:
    """`count_macs` split into {"conv": convolutions, "dense": fully connected layers}: VGG's
    convolutions alone are the count usually quoted for it (15.3e9 for VGG-16)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    graphdef, state = nnx.split(model)

    def forward(state, images):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        return copy(images)

    images = jax.ShapeDtypeStruct((1, height, width, model.in_channels), jnp.float32)
    counts = _macs(jax.make_jaxpr(forward)(state, images).jaxpr)
    return {"conv": counts["conv"], "dense": counts["dense"]}


def _macs(jaxpr: Any) -> collections.Counter:
    total = collections.Counter()
    for eqn in jaxpr.eqns:
        out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
        if eqn.primitive.name == "conv_general_dilated":
            # Each output element sums (input features per group) x (kernel window) products.
            kernel = eqn.invars[1].aval.shape
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total["conv"] += out * math.prod(kernel) // kernel[out_feature_dim]
        elif eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total["dense"] += out * math.prod(lhs[d] for d in contracting)
        else:
            total += _nested_macs(eqn)
    return total


def _nested_macs(eqn: Any) -> collections.Counter:
    """Multiply-adds inside the sub-programs of jit, scan, remat, cond and custom derivatives."""
    subs = [p for value in eqn.params.values()
            for p in (value if isinstance(value, (tuple, list)) else [value])
            if isinstance(p, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))]
    counts = [_macs(getattr(sub, "jaxpr", sub)) for sub in subs]
    if not counts:
        return collections.Counter()
    if eqn.primitive.name == "cond":  # one branch runs
        return max(counts, key=lambda count: sum(count.values()))
    repeat = eqn.params.get("length", 1)  # scan runs its body `length` times
    return collections.Counter({kind: n * repeat for kind, n in sum(counts, collections.Counter()).items()})


def train_flops_per_image(macs: int) -> int:
    """FLOPs of one training step per image: 2 per multiply-add, forward once and backward twice
    (the gradients of the inputs and of the weights), as MFU counts them."""
    return 6 * macs


# Dense bfloat16 peak FLOP/s of one JAX device, by the start of `jax.Device.device_kind`: the
# denominator of model FLOP utilisation (MFU), which multiplies it by `jax.device_count()`.
# Data sheets give it per chip. A JAX device is one TensorCore on TPU v2 and v3 (two per chip:
# half the chip's peak), one chip on v4 and v5p (their two TensorCores run as one "megacore"
# device; v5p's kind reads "TPU v5") and on v5e and v6e (one TensorCore per chip). Per chip:
# v2 180 TFLOPS per four-chip board (Google's Cloud TPU v2 announcement); "peak compute per
# chip (bf16)" of Cloud TPU's pages: v3 123, v4 275, v5e 197, v5p 459, v6e 918 TFLOPS. GPUs:
# NVIDIA's bf16 Tensor Core figures without sparsity: H100 and H200 SXM 989.4 (Hopper
# whitepaper), H100 PCIe 756, A100 312 TFLOPS. None: NVL cards, whose peak differs from the
# SXM one their shorter prefix would give; unknown (no MFU) rather than wrong.
PEAK_FLOPS: dict[str, float | None] = {
    "TPU v2": 180e12 / 4 / 2, "TPU v3": 123e12 / 2,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H200 NVL": None, "NVIDIA H200": 989.4e12,
    "NVIDIA H100 NVL": None, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100": 989.4e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The dense bfloat16 peak FLOP/s of one device of this kind (the longest prefix of
    `PEAK_FLOPS` it starts with), or None where not known (CPUs, kinds not listed)."""
    prefixes = [prefix for prefix in PEAK_FLOPS if device_kind.startswith(prefix)]
    return PEAK_FLOPS[max(prefixes, key=len)] if prefixes else None
