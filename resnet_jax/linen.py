"""resnet_jax's networks as Linen modules, for Linen projects, with Linen's train switch:

    resnet = linen.create("resnet50", num_classes=1000)      # any name and option of models.create
    variables = resnet.init(key, images)                      # {"params", "batch_stats"}
    logits, updates = resnet.apply(variables, images, mutable=["batch_stats"])  # train: batch BN
    logits = resnet.apply(variables, images, train=False)     # evaluate: running statistics

`flax.nnx.bridge.to_linen` (which this builds on) rebuilds the NNX module on every call in train
mode and has no switch; and where a train-mode call may not write `batch_stats` it drops BN's
update silently. Here that call is an error instead.
"""

from flax.core import FrozenDict
from flax.nnx import bridge

from resnet_jax import models


def _train(module, x):
    module.train()
    return module(x)


def _evaluate(module, x):
    module.eval()
    return module(x)


class ResNet(bridge.ToLinen):
    """`models.create(*args, **kwargs)` through the bridge; `train=False` normalises with BN's
    running statistics (the NNX module's `eval()`)."""

    def __call__(self, x, train: bool = True):
        if train and not self.is_initializing() and not self.is_mutable_collection("batch_stats"):
            raise ValueError("train=True updates BN's running statistics: apply(variables, x, "
                             "mutable=['batch_stats']), or train=False to evaluate")
        return super().__call__(x, nnx_method=_train if train else _evaluate)


def create(name: str, **options) -> ResNet:
    """The network `models.create(name, **options)` makes (rngs come from Linen's init key)."""
    return ResNet(models.create, args=(name,), kwargs=FrozenDict(options))
