"""model.init_from: a run that starts from weights trained elsewhere (fine-tuning).

The weights come from a torchvision (or timm) `.pth` or a `.safetensors` file (convert.py), or
from another run of this project: its workdir, whose latest checkpoint is read and verified as a
restore verifies it, and left as it is. Every weight and BN statistic of the model is loaded, but
the classifier where the class counts differ: the model keeps its freshly initialised one, said
in what `start_from` returns. Anything else that does not fit raises a ValueError naming the
first such key and both shapes, before the model is changed.
"""

from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from resnet_jax import convert
from resnet_jax.run import checkpoint, validate
from resnet_jax.training import steps

# The last layer of a ResNet and of a VGG: the one a new task replaces.
CLASSIFIERS = ("fc", "fc3")


def start_from(model: nnx.Module, path: epath.Path) -> list[str]:
    """Loads the weights at `path` (a file, or a run's workdir) into `model`; returns what was
    changed on the way, for the log."""
    if (path / checkpoint.DIRECTORY).is_dir():
        return from_run(model, path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory without {checkpoint.DIRECTORY}/: give a .pth, "
                         f".pt or .safetensors file, or the workdir of a run of this project")
    return convert.from_torchvision(model, convert.read_weights(str(path)), fine_tune=True)


def from_run(model: nnx.Module, workdir: epath.Path) -> list[str]:
    """The parameters and BN statistics of the latest checkpoint in `workdir` into `model`."""
    manager = checkpoint.reader(workdir)
    step = manager.latest_step()
    if step is None:
        raise ValueError(f"{manager.directory} holds no checkpoint")
    # Every process reads the whole checkpoint onto its first device: the weights of a model
    # not yet placed on the mesh, whatever topology saved them.
    device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
    try:
        saved = steps.current_names(checkpoint.pure(checkpoint.read(manager, step, device)))
    except checkpoint.CorruptCheckpoint as error:
        raise ValueError(f"the checkpoint of step {step} in {manager.directory}: {error}") from None
    _, params, rest = nnx.split(model, nnx.Param, ...)
    ours = {"params": nnx.to_pure_dict(params), "model_state": nnx.to_pure_dict(rest)}
    theirs = validate.dotted({part: saved[part] for part in ours})
    wanted = validate.dotted(ours)
    where = f"the checkpoint of step {step}"
    changes = [where]
    bias = next(f"params.{name}.bias" for name in CLASSIFIERS if f"params.{name}.bias" in wanted)
    classes, their_classes = wanted[bias].shape[0], np.shape(theirs.get(bias, ()))
    if their_classes and their_classes[0] != classes:
        layer = bias[:-len("bias")]
        theirs = {key: value for key, value in theirs.items() if not key.startswith(layer)}
        wanted = {key: value for key, value in wanted.items() if not key.startswith(layer)}
        changes.append(f"the classifier ({their_classes[0]} classes in the weights) is replaced "
                       f"by a new one of {classes} classes")
    for key in theirs:
        if key not in wanted:
            raise ValueError(f"unexpected key {key!r} in {where}: this model has no such array")
    for key, value in wanted.items():
        if key not in theirs:
            raise ValueError(f"{where} lacks {key!r}")
        if np.shape(theirs[key]) != np.shape(value):
            raise ValueError(f"{key!r} has shape {np.shape(theirs[key])} in {where}; this model "
                             f"needs {np.shape(value)}")
    for part, state in (("params", params), ("model_state", rest)):
        loaded = {key[len(part) + 1:]: value for key, value in theirs.items() if key.startswith(part + ".")}
        nnx.replace_by_pure_dict(state, _nested(ours[part], loaded))
    nnx.update(model, params, rest)
    return changes


def _nested(like: dict, flat: dict[str, Any], prefix: str = "") -> dict:
    """`like`'s nested dicts with the leaves of `flat` where it has them (by `validate.dotted`'s keys)."""
    return {key: (_nested(value, flat, f"{prefix}{key}.") if isinstance(value, dict)
                  else flat.get(f"{prefix}{key}", value))
            for key, value in like.items()}
