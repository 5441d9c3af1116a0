"""torchvision (and timm) ResNet and VGG state dicts to our models, and back.

torchvision's ResNets put a bottleneck block's stride on the 3x3 convolution and project with
option B, so they load into `create(name, stride_on="3x3", shortcut="B")`. timm's `resnet*`
models use the same names and load the same way. torchvision's vgg16, vgg19, vgg16_bn and
vgg19_bn load into `create` of the same name. Convolution kernels are OIHW in torch and HWIO
here; fully connected kernels are (out, in) in torch and (in, out) here. VGG's first fully
connected layer reads the pooled maps flattened (channel, height, width) in torch and (height,
width, channel) here, so its kernel's input axis is reordered too.

Scanned models (`scan_blocks=True`) keep the blocks of a stage after the first stacked on a
leading axis; both directions slice and stack them, so the keys are the same for either layout.
`transfer(source, target)` copies the weights of one network between the two layouts.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_jax import models, vgg

# torch keeps a counter per BN for momentum=None; it carries no weight and is read as nothing.
_COUNTER = "num_batches_tracked"


# (key, variable, index into a stacked variable's leading axis or None, layout).
Tensor = tuple[str, nnx.Variable, int | None, str]


def _blocks(model: models.ResNet) -> Iterator[tuple[str, models.Block, int | None]]:
    """(torchvision prefix "layerI.J", block, index) for every block; a block of a scanned
    stage is the stacked block with its index on the leading axis."""
    for i, stage in enumerate(model.stages, 1):
        j = 0
        for block in stage:
            if isinstance(block, models.ScannedBlocks):
                for index in range(block.length):
                    yield f"layer{i}.{j}", block.block, index
                    j += 1
            else:
                yield f"layer{i}.{j}", block, None
                j += 1


def _bn(prefix: str, bn: models.BatchNorm, index: int | None) -> Iterator[Tensor]:
    yield f"{prefix}.weight", bn.scale, index, "vector"
    yield f"{prefix}.bias", bn.bias, index, "vector"
    yield f"{prefix}.running_mean", bn.mean, index, "vector"
    yield f"{prefix}.running_var", bn.var, index, "vector"


def _tensors(model: models.ResNet | vgg.VGG) -> Iterator[Tensor]:
    """(torchvision key, our variable, index, layout) for every tensor of the model.

    A ResNet's keys are torchvision's; those of variants torchvision lacks (pre-activation's
    final BN "bn_final", the gates "layerI.J.gate") follow the same pattern, for `transfer`.
    """
    if isinstance(model, vgg.VGG):
        yield from _vgg_tensors(model)
        return
    yield "conv1.weight", model.conv1.kernel, None, "conv"
    if model.bn1 is not None:
        yield from _bn("bn1", model.bn1, None)
    for prefix, block, index in _blocks(model):
        for k in range(1, block.depth + 1):
            yield f"{prefix}.conv{k}.weight", getattr(block, f"conv{k}").kernel, index, "conv"
            if getattr(block, f"bn{k}") is not None:
                yield from _bn(f"{prefix}.bn{k}", getattr(block, f"bn{k}"), index)
        if block.projection is not None:
            yield f"{prefix}.downsample.0.weight", block.projection.conv.kernel, index, "conv"
            if block.projection.bn is not None:
                yield from _bn(f"{prefix}.downsample.1", block.projection.bn, index)
        if block.gate is not None:
            yield f"{prefix}.gate.weight", block.gate.conv.kernel, index, "conv"
            yield f"{prefix}.gate.bias", block.gate.conv.bias, index, "vector"
    if model.bn_final is not None:
        yield from _bn("bn_final", model.bn_final, None)
    yield "fc.weight", model.fc.kernel, None, "dense"
    yield "fc.bias", model.fc.bias, None, "vector"


def _vgg_tensors(model: vgg.VGG) -> Iterator[Tensor]:
    """torchvision's VGG keys: `features.I` numbers every layer of the convolutional part (each
    convolution, BN, ReLU and max-pool), `classifier.I` those of the classifier (Linear, ReLU,
    Dropout, Linear, ReLU, Dropout, Linear)."""
    position = 0
    layer = 0
    for size in model.stack_sizes:
        for _ in range(size):
            yield f"features.{position}.weight", model.convs[layer].kernel, None, "conv"
            yield f"features.{position}.bias", model.convs[layer].bias, None, "vector"
            position += 1
            if model.bns is not None:
                yield from _bn(f"features.{position}", model.bns[layer], None)
                position += 1
            position += 1  # ReLU
            layer += 1
        position += 1  # max-pool
    for key, fc, layout in [("classifier.0", model.fc1, "dense_pooled"),
                            ("classifier.3", model.fc2, "dense"), ("classifier.6", model.fc3, "dense")]:
        yield f"{key}.weight", fc.kernel, None, layout
        yield f"{key}.bias", fc.bias, None, "vector"


def _shape(variable: nnx.Variable, index: int | None) -> tuple[int, ...]:
    return tuple(variable.shape if index is None else variable.shape[1:])


def _read(variable: nnx.Variable, index: int | None) -> np.ndarray:
    value = np.asarray(variable[...])
    return value if index is None else value[index]


def _write(loaded: list[tuple[nnx.Variable, int | None, np.ndarray]]) -> None:
    """Assigns every value; the slices of a stacked variable are gathered into one assignment."""
    stacked: dict[int, tuple[nnx.Variable, np.ndarray]] = {}
    for variable, index, value in loaded:
        if index is None:
            variable[...] = jnp.asarray(value, variable.dtype)
        else:
            if id(variable) not in stacked:
                stacked[id(variable)] = (variable, np.array(variable[...]))
            stacked[id(variable)][1][index] = value
    for variable, value in stacked.values():
        variable[...] = jnp.asarray(value, variable.dtype)


def _to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return value.transpose(3, 2, 0, 1)
    if layout == "dense":
        return value.T
    if layout == "dense_pooled":  # rows (h, w, c) here, columns (c, h, w) in torch
        side = vgg.POOLED_SIZE
        channels = value.shape[0] // side**2
        return value.reshape(side, side, channels, -1).transpose(3, 2, 0, 1).reshape(value.shape[1], -1)
    return value


def _from_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return value.transpose(2, 3, 1, 0)
    if layout == "dense":
        return value.T
    if layout == "dense_pooled":
        side = vgg.POOLED_SIZE
        channels = value.shape[1] // side**2
        return value.reshape(-1, channels, side, side).transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    return value


def _check_torchvision_layout(model: models.ResNet | vgg.VGG) -> None:
    if isinstance(model, vgg.VGG):
        return  # every VGG here has torchvision's layout; a different width fails on shapes
    blocks = [block for _, block, _ in _blocks(model)]
    if not model.max_pool or len(model.stages) != 4:
        raise ValueError("torchvision ResNets are ImageNet networks: create one with create('resnetN', ...)")
    if any(not block.residual for block in blocks):
        raise ValueError("torchvision has no plain networks: create a residual one ('resnetN')")
    if model.block_order != "post" or any(block.gate is not None for block in blocks):
        raise ValueError("torchvision ResNets have the paper's blocks: create the model with "
                         "block_order='post' and gate='none'")
    reshaping = [b.stride != 1 or b.conv1.in_features != b.out_features for b in blocks]
    if any((b.projection is None) == reshapes for b, reshapes in zip(blocks, reshaping)):
        raise ValueError("torchvision ResNets use shortcut='B': create the model with shortcut='B'")
    for block in blocks:
        if isinstance(block, models.BottleneckBlock) and block.conv1.strides != (1, 1):
            raise ValueError("torchvision ResNets put the stride on the 3x3 convolution: create the "
                             "model with stride_on='3x3'")


def from_torchvision(model: models.ResNet | vgg.VGG, state_dict: Mapping[str, Any],
                     fine_tune: bool = False) -> list[str]:
    """Loads a torchvision ResNet's or VGG's state dict (torch tensors or numpy arrays) into `model`.

    `model` must be `create("resnetN", stride_on="3x3", shortcut="B")` of the same depth and
    class count, or `create("vgg16")` (and so on) of the same name and class count. Every
    parameter and BN running statistic is loaded; a missing, unexpected or misshapen key raises
    a ValueError that names it and both shapes. Nothing is changed unless all keys fit.

    `fine_tune=True` starts a new task from the weights: a `module.` prefix (torch's
    DistributedDataParallel) is dropped, and where the classifier's class count differs from the
    model's, the model keeps its own freshly initialised classifier. Returns what it changed so,
    for the log.
    """
    _check_torchvision_layout(model)
    expected = list(_tensors(model))
    changes = []
    if fine_tune:
        state_dict, changes, replaced = _for_fine_tuning(state_dict, expected)
        expected = [t for t in expected if t[0] not in replaced]
    known = {key for key, _, _, _ in expected}
    for key in state_dict:
        if key not in known and not key.endswith(_COUNTER):
            raise ValueError(f"unexpected key {key!r} in the state dict: this model has no such tensor")
    loaded = []
    for key, variable, index, layout in expected:
        if key not in state_dict:
            raise ValueError(f"the state dict lacks {key!r}")
        value = state_dict[key]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        needed = _to_torch_layout(np.empty(_shape(variable, index), np.bool_), layout).shape
        if value.shape != needed:
            raise ValueError(f"{key!r} has shape {value.shape} in the state dict; this model needs {needed}")
        loaded.append((variable, index, _from_torch_layout(value, layout)))
    _write(loaded)
    return changes


def _for_fine_tuning(state_dict: Mapping[str, Any],
                     expected: list[Tensor]) -> tuple[dict, list[str], tuple[str, ...]]:
    """(the state dict to load, what was changed, the model's keys left as they are)."""
    changes, replaced = [], ()
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
        changes.append("dropped the 'module.' prefix of DistributedDataParallel")
    state_dict = dict(state_dict)
    last_weight, last_bias = expected[-2][0], expected[-1][0]  # the classifier comes last
    ours = _shape(expected[-1][1], expected[-1][2])[0]
    theirs = np.shape(state_dict.get(last_bias, ()))
    if theirs and theirs[0] != ours:
        del state_dict[last_weight], state_dict[last_bias]
        replaced = (last_weight, last_bias)
        changes.append(f"the classifier ({theirs[0]} classes in the weights) is replaced by a new "
                       f"one of {ours} classes")
    return state_dict, changes, replaced


def read_weights(path: str) -> dict[str, Any]:
    """A state dict from a file: torch's `.pth`/`.pt` (torch.save of a state dict, loaded with
    weights_only) or `.safetensors`."""
    from etils import epath  # pylint: disable=import-outside-toplevel
    name = epath.Path(path).name
    if not name.endswith((".safetensors", ".pth", ".pt")):
        raise ValueError(f"{path}: weights are read from .pth, .pt or .safetensors files")
    with epath.Path(path).open("rb") as f:
        data = f.read()
    if name.endswith(".safetensors"):
        try:
            from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
        except ImportError:
            raise ValueError(f"{path}: reading safetensors needs `pip install safetensors`") from None
        return load(data)
    import io  # pylint: disable=import-outside-toplevel
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ValueError(f"{path}: reading torch files needs `pip install torch`") from None
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state.get("state_dict", state)  # a training script's {"state_dict": ...} too


def to_torchvision(model: models.ResNet | vgg.VGG) -> dict[str, np.ndarray]:
    """The model's weights as a torchvision ResNet or VGG state dict of numpy arrays.

    The BN counters `num_batches_tracked` are included as 0 so that torch's strict
    `load_state_dict` accepts the dict (`{k: torch.from_numpy(v) for k, v in d.items()}`).
    """
    _check_torchvision_layout(model)
    state = {}
    for key, variable, index, layout in _tensors(model):
        state[key] = np.array(_to_torch_layout(_read(variable, index), layout))
        if key.endswith(".running_var"):
            state[key.replace("running_var", _COUNTER)] = np.array(0, np.int64)
    return state


def transfer(source: models.ResNet, target: models.ResNet) -> None:
    """Copies every parameter and BN statistic of `source` into `target`: the same network
    (name and options) in either layout, scanned (`scan_blocks=True`) or unrolled.

    Works for every network: CIFAR, plain and VGG ones, every block order and gate. A checkpoint
    written by one layout is read into a model of that layout and transferred to the other.
    """
    sources = {key: (variable, index) for key, variable, index, _ in _tensors(source)}
    loaded = []
    for key, variable, index, _ in _tensors(target):
        if key not in sources or _shape(*sources[key]) != _shape(variable, index):
            raise ValueError(f"the models differ at {key!r}: transfer copies between the layouts "
                             f"of one network")
        loaded.append((variable, index, _read(*sources[key])))
    if len(loaded) != len(sources):
        raise ValueError("the models differ in their number of tensors: transfer copies between "
                         "the layouts of one network")
    _write(loaded)
