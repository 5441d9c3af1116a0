"""Looking inside trained networks: a run's model from its workdir, its layer responses (Fig. 7)
and the lesion study.

He et al., Sec. 4.2, "Analysis of Layer Responses": the standard deviation of the responses of
each 3x3 layer, "the outputs of each 3x3 layer, after BN and before other nonlinearity
(ReLU/addition)". Residual functions should be closer to zero than their plain counterparts:
ResNets have smaller responses, and deeper ResNets smaller still.

Veit, Wilber and Belongie 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks": deleting a single block of a trained ResNet barely changes its test error, except at
the down-sampling blocks, and the error grows smoothly with the number of blocks deleted; a
plain network fails when any layer is taken out.
"""

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from resnet_jax import convert, models
from resnet_jax.cli import config_files
from resnet_jax.data import device_inputs, pipeline, preprocess
from resnet_jax.run import checkpoint
from resnet_jax.training import steps


def build_model(config: Any, num_classes: int, **changes: Any) -> models.ResNet:
    """The model a run's config names, freshly initialised, with `changes` to its options."""
    return models.create(config.model.name, num_classes=num_classes, rngs=nnx.Rngs(0),
                         **{**steps.model_options(config), **changes})


def load_model(workdir: str) -> tuple[ml_collections.ConfigDict, models.ResNet, int]:
    """(config, model in eval mode with the latest checkpoint's weights, its step).

    A ResNet is built unrolled and without remat whatever the run used, so that each block can
    be looked at and changed on its own.
    """
    config = config_files.of_run(workdir)
    step, state = checkpoint.read_latest(workdir)
    state = checkpoint.pure(state)
    classifier = state["params"]["fc" if "fc" in state["params"] else "fc3"]  # ResNet or VGG
    num_classes = classifier["kernel"].shape[-1]
    model = steps.with_weights(build_model(config, num_classes), state)
    if isinstance(model, models.ResNet) and (model.scan_blocks or model.remat):
        # Each block on its own, computed eagerly: what the analyses here look at and change.
        unrolled = build_model(config, num_classes, scan_blocks=False, remat=False)
        convert.transfer(model, unrolled)
        model = unrolled
    model.eval()
    return config, model, step


def eval_images(config: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` (or fewer) images and labels of the run's eval split, preprocessed as in
    its evaluation: one image each, so the centre crop (one of the ten crops) where the run tests
    with several views of each (`preprocess.MANY_VIEWS`)."""
    images, labels = [], []
    data_config = config.data
    if data_config.eval_preprocess in preprocess.MANY_VIEWS:
        data_config = ml_collections.ConfigDict({**data_config.to_dict(), "eval_preprocess": "center"})
    normalise = device_inputs.normaliser(data_config)
    for batch in pipeline.eval_iterator(data_config, batch_size=min(count, 256)):
        batch = jax.device_get(normalise(batch))
        keep = batch["mask"]
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
        if sum(map(len, labels)) >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


@contextlib.contextmanager
def _responses_of_3x3_layers(responses: list[jax.Array]):
    """Appends to `responses` the output of every BN whose input is the output of a 3x3
    convolution, in the order the network computes them.

    It watches the calls instead of asking the modules for their insides, so that it reads every
    block kind the same way. The forward pass must run eagerly (no jit, no scan): an array's
    identity tells which BN reads which convolution.
    """
    conv_call, bn_call = nnx.Conv.__call__, models.BatchNorm.__call__
    outputs_3x3 = []  # kept alive, so that their ids stay unique

    def watched_conv(self, x):
        y = conv_call(self, x)
        if tuple(self.kernel_size) == (3, 3):
            outputs_3x3.append(y)
        return y

    def watched_bn(self, x):
        y = bn_call(self, x)
        if any(x is out for out in outputs_3x3):
            responses.append(y)
        return y

    nnx.Conv.__call__, models.BatchNorm.__call__ = watched_conv, watched_bn
    try:
        yield
    finally:
        nnx.Conv.__call__, models.BatchNorm.__call__ = conv_call, bn_call


def _check_unrolled_resnet(model: nnx.Module) -> None:
    if not isinstance(model, models.ResNet) or model.scan_blocks or model.remat:
        raise ValueError("layer responses and lesions need a ResNet built with scan_blocks=False "
                         "and remat=False (load_model builds one)")


def layer_responses(model: models.ResNet, images: np.ndarray) -> np.ndarray:
    """Fig. 7: for each 3x3 layer in depth order, the standard deviation of its response (after
    BN, before ReLU and addition) over the images and positions, per channel, averaged over the
    layer's channels. Per channel, so that BN's learned shift (a mean) does not count as spread.
    """
    _check_unrolled_resnet(model)
    if model.block_order != "post":
        # In the other orders a block's last 3x3 layer is not followed by a BN of its own.
        raise ValueError(f"layer responses are defined for block_order='post' (Fig. 7); got "
                         f"{model.block_order!r}")
    responses: list[jax.Array] = []
    with _responses_of_3x3_layers(responses):
        model(jnp.asarray(images))
    return np.array([float(jnp.std(r.astype(jnp.float32), axis=(0, 1, 2)).mean()) for r in responses])


def error_rate(model: nnx.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 250) -> float:
    """Top-1 error (%) of the model in its current state. Eager, not jit: a lesion changes the
    module's structure, and compiling each of a study's many structures would cost more than
    running them."""
    wrong = 0
    for start in range(0, len(images), batch_size):
        logits = model(jnp.asarray(images[start:start + batch_size]))
        wrong += int((np.asarray(jnp.argmax(logits, -1)) != labels[start:start + batch_size]).sum())
    return 100.0 * wrong / len(images)


@dataclasses.dataclass
class LesionStudy:
    """Errors (%) of a network with blocks deleted. `single[i]`: block i alone deleted (None for
    a plain block that changes the shape: nothing could carry its input on); `random[k]`: each
    draw of k deletable blocks deleted together."""

    baseline: float
    names: list[str]
    downsamples: list[bool]
    single: list[float | None]
    random: dict[int, list[float]]


@contextlib.contextmanager
def _lesioned(infos: list, indices) -> Any:
    for i in indices:
        infos[i].block.lesioned = True
    try:
        yield
    finally:
        for i in indices:
            infos[i].block.lesioned = False


def lesion_study(model: models.ResNet, images: np.ndarray, labels: np.ndarray, *,
                 max_deleted: int, draws: int, seed: int = 0) -> LesionStudy:
    """Veit et al. 2016, Fig. 3 and 5: each block deleted alone (its residual branch removed, the
    shortcut kept), then k random blocks at once for k = 1..max_deleted, `draws` times each."""
    _check_unrolled_resnet(model)
    infos = models.blocks(model)
    deletable = [i for i, info in enumerate(infos) if info.block.residual or not info.reshapes]
    single = []
    for i in range(len(infos)):
        if i in deletable:
            with _lesioned(infos, [i]):
                single.append(error_rate(model, images, labels))
        else:
            single.append(None)
    rng = np.random.default_rng(seed)
    random = {}
    for k in range(1, min(max_deleted, len(deletable)) + 1):
        random[k] = []
        for _ in range(draws):
            with _lesioned(infos, rng.choice(deletable, size=k, replace=False)):
                random[k].append(error_rate(model, images, labels))
    return LesionStudy(error_rate(model, images, labels), [info.name for info in infos],
                       [info.downsamples for info in infos], single, random)
