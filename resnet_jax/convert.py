"""torchvision (and timm) ResNet state dicts to our models, and back.

torchvision's ResNets put a bottleneck block's stride on the 3x3 convolution and project with
option B, so they load into `create(name, stride_on="3x3", shortcut="B")`. timm's `resnet*`
models use the same names and load the same way. Convolution kernels are OIHW in torch and HWIO
here; fully connected kernels are (out, in) in torch and (in, out) here.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_jax import models

# torch keeps a counter per BN for momentum=None; it carries no weight and is read as nothing.
_COUNTER = "num_batches_tracked"


def _bn(prefix: str, bn: models.BatchNorm) -> Iterator[tuple[str, nnx.Variable, str]]:
    yield f"{prefix}.weight", bn.scale, "vector"
    yield f"{prefix}.bias", bn.bias, "vector"
    yield f"{prefix}.running_mean", bn.mean, "vector"
    yield f"{prefix}.running_var", bn.var, "vector"


def _tensors(model: models.ResNet) -> Iterator[tuple[str, nnx.Variable, str]]:
    """(torchvision key, our variable, layout) for every tensor of a torchvision ResNet."""
    yield "conv1.weight", model.conv1.kernel, "conv"
    yield from _bn("bn1", model.bn1)
    for i, stage in enumerate(model.stages, 1):
        for j, block in enumerate(stage):
            prefix = f"layer{i}.{j}"
            k = 1
            while hasattr(block, f"conv{k}"):
                yield f"{prefix}.conv{k}.weight", getattr(block, f"conv{k}").kernel, "conv"
                yield from _bn(f"{prefix}.bn{k}", getattr(block, f"bn{k}"))
                k += 1
            if block.projection is not None:
                yield f"{prefix}.downsample.0.weight", block.projection.conv.kernel, "conv"
                yield from _bn(f"{prefix}.downsample.1", block.projection.bn)
    yield "fc.weight", model.fc.kernel, "dense"
    yield "fc.bias", model.fc.bias, "vector"


def _to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return value.transpose(3, 2, 0, 1)
    if layout == "dense":
        return value.T
    return value


def _from_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return value.transpose(2, 3, 1, 0)
    if layout == "dense":
        return value.T
    return value


def _check_torchvision_layout(model: models.ResNet) -> None:
    blocks = [block for stage in model.stages for block in stage]
    if not model.max_pool or len(model.stages) != 4:
        raise ValueError("torchvision ResNets are ImageNet networks: create one with create('resnetN', ...)")
    if any(not block.residual for block in blocks):
        raise ValueError("torchvision has no plain networks: create a residual one ('resnetN')")
    reshaping = [b for b in blocks if b.stride != 1 or b.conv1.in_features != b.out_features]
    if any(b.projection is None for b in reshaping) or any(
            b.projection is not None for b in blocks if b not in reshaping):
        raise ValueError("torchvision ResNets use shortcut='B': create the model with shortcut='B'")
    for block in blocks:
        if isinstance(block, models.BottleneckBlock) and block.conv1.strides != (1, 1):
            raise ValueError("torchvision ResNets put the stride on the 3x3 convolution: create the "
                             "model with stride_on='3x3'")


def from_torchvision(model: models.ResNet, state_dict: Mapping[str, Any]) -> None:
    """Loads a torchvision ResNet's state dict (torch tensors or numpy arrays) into `model`.

    `model` must be `create("resnetN", stride_on="3x3", shortcut="B")` of the same depth and
    class count. Every parameter and BN running statistic is loaded; a missing, unexpected or
    misshapen key raises a ValueError that names it. Nothing is changed unless all keys fit.
    """
    _check_torchvision_layout(model)
    expected = list(_tensors(model))
    known = {key for key, _, _ in expected}
    for key in state_dict:
        if key not in known and not key.endswith(_COUNTER):
            raise ValueError(f"unexpected key {key!r} in the state dict: this model has no such tensor")
    loaded = []
    for key, variable, layout in expected:
        if key not in state_dict:
            raise ValueError(f"the state dict lacks {key!r}")
        value = state_dict[key]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        needed = _to_torch_layout(np.empty(variable.shape, np.bool_), layout).shape
        if value.shape != needed:
            raise ValueError(f"{key!r} has shape {value.shape} in the state dict; this model needs {needed}")
        loaded.append((variable, _from_torch_layout(value, layout)))
    for variable, value in loaded:
        variable[...] = jnp.asarray(value, variable.dtype)


def to_torchvision(model: models.ResNet) -> dict[str, np.ndarray]:
    """The model's weights as a torchvision ResNet state dict of numpy arrays.

    The BN counters `num_batches_tracked` are included as 0 so that torch's strict
    `load_state_dict` accepts the dict (`{k: torch.from_numpy(v) for k, v in d.items()}`).
    """
    _check_torchvision_layout(model)
    state = {}
    for key, variable, layout in _tensors(model):
        state[key] = np.array(_to_torch_layout(np.asarray(variable[...]), layout))
        if key.endswith(".running_var"):
            state[key.replace("running_var", _COUNTER)] = np.array(0, np.int64)
    return state
