"""scan_blocks and remat change how the network runs, never what it computes or how it is stored."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import convert, cpu, flops, models


def images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def create(name, **options):
    return models.create(name, num_classes=10, rngs=nnx.Rngs(0), **options)


def assert_trees_close(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


def torch_keyed(model):
    """Every weight and BN statistic by its torchvision-style key: comparable across layouts."""
    return {key: convert._read(variable, index) for key, variable, index, _ in convert._tensors(model)}


@pytest.mark.slow
def test_identical_blocks_after_the_first_are_one_stacked_block():
    model = nnx.eval_shape(lambda: create("resnet152", scan_blocks=True))
    lengths = [stage[1].length for stage in model.stages]
    assert lengths == [2, 7, 35, 2] and all(len(stage) == 2 for stage in model.stages)
    assert model.stages[2][1].block.conv2.kernel.shape == (35, 3, 3, 256, 256)
    # A stage of two blocks stays unrolled: a scan of one block would gain nothing.
    assert all(len(stage) == 2 and not isinstance(stage[1], models.ScannedBlocks)
               for stage in nnx.eval_shape(lambda: create("resnet18", scan_blocks=True)).stages)


@pytest.mark.parametrize("name", ["resnet50", "cifar_resnet56", "cifar_plain20"])
def test_counts_are_those_of_the_unrolled_network(name):
    unrolled = nnx.eval_shape(lambda: create(name))
    scanned = nnx.eval_shape(lambda: create(name, scan_blocks=True))
    size = 32 if name.startswith("cifar") else 224
    assert flops.count_params(scanned) == flops.count_params(unrolled)
    assert flops.count_macs(scanned, size) == flops.count_macs(unrolled, size)


def run(model, x, train):
    """features(x) and the BN statistics after it, jitted (eager dispatch is slow here)."""
    model.train() if train else model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        copy = nnx.merge(graphdef, state)
        maps = copy.features(x)  # model(x) is fc(pooled): its logits, without a second forward
        return maps, copy.fc(maps["pooled"]), nnx.state(copy, nnx.BatchStat)

    maps, logits, stats = forward(state, x)
    nnx.update(model, stats)
    return maps, logits


@pytest.mark.slow
@pytest.mark.parametrize("name, options, size, modes", [
    ("resnet50", {"stride_on": "3x3"}, 32, (True,)),
    ("cifar_resnet20", {"shortcut": "C", "bn_group_size": 2}, 8, (True, False))])
def test_scanned_network_computes_what_the_unrolled_one_does(name, options, size, modes):
    # The same seed gives the same weights in both layouts.
    unrolled, scanned = create(name, **options), create(name, scan_blocks=True, **options)
    before = torch_keyed(unrolled)
    assert torch_keyed(scanned).keys() == before.keys()
    for key, value in torch_keyed(scanned).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    x = images((4, size, size, 3))
    for train in modes:
        (a, logits_a), (b, logits_b) = run(unrolled, x, train), run(scanned, x, train)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4, err_msg=f"{train} {key}")
        np.testing.assert_allclose(logits_a, logits_b, rtol=1e-4, atol=1e-4)
    # BN's running statistics moved, and alike in both.
    after_unrolled, after_scanned = torch_keyed(unrolled), torch_keyed(scanned)
    assert not np.allclose(after_unrolled["layer1.1.bn1.running_mean"], before["layer1.1.bn1.running_mean"])
    for key in after_unrolled:
        np.testing.assert_allclose(after_scanned[key], after_unrolled[key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def loss_and_grads(model, x, labels):
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(params):
        copy = nnx.merge(graphdef, params, stats, copy=True)
        logits = copy(x)
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1).mean()
        return loss, nnx.state(copy, nnx.BatchStat)

    (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    # Keyed alike in every layout: the gradients, and the BN statistics the step moved.
    return loss, torch_keyed(nnx.merge(graphdef, grads, stats)), torch_keyed(
        nnx.merge(graphdef, params, new_stats))


@pytest.mark.slow
def test_scan_and_remat_change_no_gradient():
    x, labels = images((4, 8, 8, 3)), jnp.arange(4) % 10
    loss, grads, moved = loss_and_grads(create("cifar_resnet20"), x, labels)
    for options in [{"remat": True}, {"scan_blocks": True, "remat": True}]:
        other_loss, other_grads, other_moved = loss_and_grads(create("cifar_resnet20", **options),
                                                              x, labels)
        np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
        for key, value in grads.items():
            np.testing.assert_allclose(other_grads[key], value, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{options} {key}")
        for key in moved:
            if "running" in key:
                np.testing.assert_allclose(other_moved[key], moved[key], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{options} {key}")


def lowered_gradient(remat, x):
    """The gradient of CIFAR ResNet-8's summed logits on x, lowered."""
    graphdef, params, stats = nnx.split(create("cifar_resnet8", remat=remat), nnx.Param, ...)
    return jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, stats, copy=True)(x).sum())).lower(params)


@pytest.mark.slow
def test_remat_recomputes_in_the_backward_pass():
    # On the compiled program, not the jaxpr: XLA's CPU backend merged jax.checkpoint's
    # recomputation back into the forward pass (the same 13 convolutions and temporaries).
    compiled = {remat: lowered_gradient(remat, images((32, 16, 16, 3))).compile() for remat in (False, True)}
    convolutions = {remat: c.as_text().count(" convolution(") for remat, c in compiled.items()}
    # Each of the three blocks runs its two convolutions again.
    assert convolutions[True] == convolutions[False] + 6, convolutions
    temporaries = {remat: c.memory_analysis().temp_size_in_bytes for remat, c in compiled.items()}
    assert temporaries[True] < 0.8 * temporaries[False], temporaries


# GPUs and TPUs rematerialise with jax.checkpoint (models._rematerialised), chosen here on the
# CPU by making cpu.in_use() false. In a process without the CPU fusion flag: with it, XLA's CPU
# backend miscompiles jax.checkpoint's optimisation barriers (the gradients below differ by up to
# 0.49, jax 0.10.2), one more reason the CPU has its own remat.
_ACCELERATOR_REMAT_GRADIENTS = """
import jax, jax.numpy as jnp
from flax import nnx
from resnet_jax import cpu, models
cpu.in_use = lambda: False
jax.config.update("jax_default_matmul_precision", "highest")
x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
labels = jnp.arange(4) % 10
def gradients(**options):
    model = models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(0), **options)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    def loss(params):
        logits = nnx.merge(graphdef, params, stats, copy=True)(x)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1).mean()
    return jax.tree.leaves(jax.jit(jax.grad(loss))(params))
for scan_blocks in (False, True):
    plain, other = (gradients(scan_blocks=scan_blocks, remat=remat) for remat in (False, True))
    print(max(float(jnp.abs(a - b).max() / (jnp.abs(a).max() + 1e-6)) for a, b in zip(plain, other)))
"""


@pytest.mark.slow
def test_remat_on_accelerators_changes_no_gradient():
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _ACCELERATOR_REMAT_GRADIENTS], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    differences = [float(line) for line in out.stdout.split()]
    assert len(differences) == 2 and max(differences) < 1e-4, differences


def test_remat_on_accelerators_is_jax_checkpoint_keeping_bn_statistics(monkeypatch):
    # Lowered, before XLA's passes: the backward pass runs each block's two convolutions again,
    # and, the BN statistics kept, reduces nothing more than without remat, so that on a mesh
    # remat adds no collective (tests/test_benchmarks.py counts them).
    monkeypatch.setattr(cpu, "in_use", lambda: False)
    lowered = {remat: lowered_gradient(remat, images((4, 8, 8, 3))).as_text() for remat in (False, True)}
    convolutions = {remat: text.count("stablehlo.convolution") for remat, text in lowered.items()}
    assert convolutions[True] == convolutions[False] + 6, convolutions
    reductions = {remat: text.count("stablehlo.reduce") for remat, text in lowered.items()}
    assert reductions[True] == reductions[False], reductions


def test_transfer_between_layouts_round_trips():
    scanned = create("cifar_resnet20", scan_blocks=True, shortcut="C")
    unrolled = models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(1), shortcut="C")
    convert.transfer(scanned, unrolled)
    back = models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(2), shortcut="C",
                         scan_blocks=True)
    convert.transfer(unrolled, back)
    assert_trees_close(nnx.state(back), nnx.state(scanned), rtol=0, atol=0)
    assert_trees_close(torch_keyed(unrolled), torch_keyed(scanned), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layouts of one network"):
        convert.transfer(scanned, create("cifar_resnet32"))


def test_torchvision_conversion_of_a_scanned_model():
    unrolled = create("resnet50", stride_on="3x3")
    scanned = models.create("resnet50", num_classes=10, rngs=nnx.Rngs(5), stride_on="3x3",
                            scan_blocks=True)
    exported = convert.to_torchvision(unrolled)
    convert.from_torchvision(scanned, exported)
    for key, value in convert.to_torchvision(scanned).items():
        np.testing.assert_array_equal(value, exported[key], err_msg=key)
    assert_trees_close(torch_keyed(scanned), torch_keyed(unrolled), rtol=0, atol=0)
    with pytest.raises(ValueError, match="stride_on='3x3'"):
        convert.to_torchvision(create("resnet50", scan_blocks=True))


def test_options_are_checked():
    for option in ("scan_blocks", "remat"):
        with pytest.raises(ValueError, match=f"{option} must be True or False"):
            create("cifar_resnet8", **{option: "yes"})

