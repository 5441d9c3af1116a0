"""Linen projects use the NNX modules through flax.nnx.bridge.to_linen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from resnet_jax import linen, models


@pytest.mark.slow
def test_linen_wrapper_initialises_trains_and_matches_nnx():
    linen_model = nnx.bridge.to_linen(models.create, "cifar_resnet8", num_classes=10)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    labels = jnp.array([0, 3, 5, 9])
    variables = linen_model.init(jax.random.key(0), x)
    assert set(variables) == {"params", "batch_stats"}

    def loss(params, batch_stats):
        logits, updates = linen_model.apply({"params": params, "batch_stats": batch_stats}, x,
                                            mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (before, updates), grads = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], variables["batch_stats"])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    after, _ = loss(params, updates["batch_stats"])
    assert after < before  # one SGD step on the wrapped model learned something

    # The NNX module with the same weights gives the same outputs.
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(7))
    graphdef, nnx_params, nnx_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    nnx.replace_by_pure_dict(nnx_params, params)
    nnx.replace_by_pure_dict(nnx_stats, updates["batch_stats"])
    model = nnx.merge(graphdef, nnx_params, nnx_stats)
    expected, moved = linen_model.apply({"params": params, "batch_stats": updates["batch_stats"]}, x,
                                        mutable=["batch_stats"])
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.bn1.mean[...], moved["batch_stats"]["bn1"]["mean"], rtol=1e-6)


def test_linen_module_has_an_eval_mode_equal_to_nnx_eval():
    resnet = linen.create("cifar_resnet8", num_classes=10)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = resnet.init(jax.random.key(0), x)
    trained, updates = resnet.apply(variables, x, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    evaluated = resnet.apply(variables, x, train=False)

    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(5))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.replace_by_pure_dict(batch_stats, variables["batch_stats"])
    model = nnx.merge(graphdef, params, batch_stats)
    model.eval()
    np.testing.assert_array_equal(evaluated, model(x))
    assert np.abs(np.asarray(trained) - np.asarray(evaluated)).max() > 0.1  # batch vs running BN
    # Evaluation changes nothing, so it needs nothing mutable; training without a place to put
    # BN's update is an error, not a silent loss of it.
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        resnet.apply(variables, x)


def test_linen_init_traces_the_forward_pass_and_returns_what_running_it_would(xla_compiles):
    resnet = linen.create("cifar_resnet8", num_classes=10, width=8)
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
    resnet.init(jax.random.key(0), x[:1, :8, :8])  # what is compiled once
    xla_compiles.clear()  # shapes no other test uses: running the pass compiled each layer's
    variables = resnet.init(jax.random.key(0), x)
    assert xla_compiles == []
    logits, run = resnet.init_with_output(jax.random.key(0), x)
    assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
    assert jax.tree.structure(variables) == jax.tree.structure(run)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(run), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
