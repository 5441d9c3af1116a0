"""resnet_jax's networks as Linen modules, for Linen projects, with Linen's train switch:

    resnet = linen.create("resnet50", num_classes=1000)      # any name and option of models.create
    variables = resnet.init(key, images)                      # {"params", "batch_stats"}
    logits, updates = resnet.apply(variables, images, mutable=["batch_stats"])  # train: batch BN
    logits = resnet.apply(variables, images, train=False)     # evaluate: running statistics

`flax.nnx.bridge.to_linen` (which this builds on) rebuilds the NNX module on every call in train
mode and has no switch; and where a train-mode call may not write `batch_stats` it drops BN's
update silently. Here that call is an error instead.
"""

import contextvars

import jax
from flax import nnx
from flax.core import FrozenDict
from flax.nnx import bridge

from resnet_jax import models


def _train(module, x):
    module.train()
    return module(x)


def _evaluate(module, x):
    module.eval()
    return module(x)


def _output_shape(method):
    """`method`'s output traced, not run: its shape and dtype."""
    def traced(module, x):
        graphdef, state = nnx.split(module)
        return jax.eval_shape(lambda state, x: method(nnx.merge(graphdef, state), x), state, x)
    return traced


_IN_INIT = contextvars.ContextVar("in_init", default=False)


class ResNet(bridge.ToLinen):
    """`models.create(*args, **kwargs)` through the bridge; `train=False` normalises with BN's
    running statistics (the NNX module's `eval()`)."""

    def __call__(self, x, train: bool = True):
        if train and not self.is_initializing() and not self.is_mutable_collection("batch_stats"):
            raise ValueError("train=True updates BN's running statistics: apply(variables, x, "
                             "mutable=['batch_stats']), or train=False to evaluate")
        method = _train if train else _evaluate
        if self.is_initializing() and _IN_INIT.get():
            method = _output_shape(method)
        return super().__call__(x, nnx_method=method)

    def init(self, *args, **kwargs):
        """Linen's `init`, which returns the variables alone (saved before the forward pass):
        the pass is traced, not run; run eagerly, it compiled every layer's operations."""
        token = _IN_INIT.set(True)
        try:
            return super().init(*args, **kwargs)
        finally:
            _IN_INIT.reset(token)


def create(name: str, **options) -> ResNet:
    """The network `models.create(name, **options)` makes (rngs come from Linen's init key)."""
    return ResNet(models.create, args=(name,), kwargs=FrozenDict(options))
