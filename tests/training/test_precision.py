"""bfloat16 compute against float32: one train step of the same network from the same state on the
same batch. On GPUs and TPUs `model.dtype="auto"` runs every step in bfloat16, so this is the check
that such a step still trains as the float32 one does. benchmarks/gpu_check.py runs it on a GPU.

And what stays float32 in such a step: the convolutions' kernel gradients, before they are summed
over the devices (`layers.mixed_conv`; the all-reduces of the partitioned step), and the
classifier, at HIGHEST precision."""

import collections
import functools
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks import collectives
from configs import default
from resnet_jax import layers, models
from resnet_jax.training import losses, metrics, optim, steps
from runs import REPO, environment

BATCH = 32


def _one_step(dtype: str, batch: dict[str, np.ndarray]):
    """(loss, parameter update, state after) of one step of CIFAR ResNet-20 from He init."""
    model = models.create("cifar_resnet20", num_classes=10, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
    schedule = optax.constant_schedule(0.1)
    tx = optim.create_optimizer(default.get_config().optimizer, schedule)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                             opt_state=tx.init(params), train_metrics=metrics.TrainMetrics.empty(),
                             skipped=jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(steps.train_step, graphdef, tx, schedule, losses.Loss(), False))
    before = jax.device_get(params)
    after, health = step(state, batch)
    assert bool(health["loss"]) and int(health["gradients"]) == -1, f"{dtype}: non-finite step"
    update = jax.tree.map(lambda new, old: np.asarray(new, np.float64) - np.asarray(old, np.float64),
                          jax.device_get(after.params), before)
    flat = np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(update)])
    return float(after.train_metrics.compute()["loss"]), flat, after


@pytest.fixture(scope="module")
def one_step_each():
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((BATCH, 32, 32, 3), np.float32),
             "label": rng.integers(0, 10, BATCH).astype(np.int32)}
    return {dtype: _one_step(dtype, batch) for dtype in ("bfloat16", "float32")}


@pytest.mark.slow
def test_bfloat16_step_is_close_to_the_float32_step(one_step_each):
    (low_loss, low, _), (high_loss, high, _) = one_step_each["bfloat16"], one_step_each["float32"]
    assert np.isfinite(low).all() and np.isfinite(high).all()
    # Measured on the CPU (2026-12-02): losses 3.5014 and 3.5009; the updates' cosine 0.995, their
    # difference 10% of the float32 update's norm (bfloat16's 8-bit mantissa, through 20 layers).
    assert abs(low_loss - high_loss) < 0.02, (low_loss, high_loss)
    cosine = low @ high / (np.linalg.norm(low) * np.linalg.norm(high))
    assert cosine > 0.98, cosine
    assert np.linalg.norm(low - high) < 0.2 * np.linalg.norm(high)


@pytest.mark.slow
def test_bfloat16_step_keeps_float32_state(one_step_each):
    # Only the compute is bfloat16: parameters, optimizer state, BN statistics and the loss window
    # stay float32, so that small updates are not rounded away.
    *_, state = one_step_each["bfloat16"]
    floats = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state,
                                                      state.model_state, state.train_metrics))
              if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert floats == {jnp.dtype("float32")}


# Mixed precision's convolution: bfloat16 compute, float32 kernel gradient (layers.mixed_conv).
# Shapes as layers.Layers pads them, (k - 1) // 2 each side: strides 1 and 2, kernels 1, 3 and
# 7, odd and even maps (at stride 2 an even map leaves rows that no output reads).
DIMENSIONS = ("NHWC", "HWIO", "NHWC")
CONVS = [(1, 1, 8), (1, 2, 8), (3, 1, 7), (3, 2, 8), (3, 2, 9), (7, 2, 10), (7, 2, 11), (7, 1, 6)]


def _conv_case(size: int, stride: int, map_size: int, dtype):
    keys = jax.random.split(jax.random.key(size * 100 + stride * 10 + map_size), 3)
    x = jax.random.normal(keys[0], (4, map_size, map_size + 1, 6)).astype(dtype)
    kernel = jax.random.normal(keys[1], (size, size, 6, 5), jnp.float32)
    pad = (size - 1) // 2
    padding = ((pad, pad), (pad, pad))
    out = jax.eval_shape(lambda: jax.lax.conv_general_dilated(
        x, kernel.astype(dtype), (stride, stride), padding, dimension_numbers=DIMENSIONS))
    grad = jax.random.normal(keys[2], out.shape).astype(dtype)
    return x, kernel, (stride, stride), padding, grad


@functools.partial(jax.jit, static_argnums=(2, 3))
def _plain_vjp(x, kernel, strides, padding, grad):
    """nnx.Conv without mixed_conv: the kernel cast to the input's dtype, JAX's own transposition;
    the kernel gradient in that dtype, as the devices sum it (returned so, that XLA may not
    skip the rounding)."""
    y, vjp = jax.vjp(lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=DIMENSIONS), x, kernel.astype(x.dtype))
    return y, *vjp(grad)


@functools.partial(jax.jit, static_argnums=(2, 3, 5))
def _mixed_vjp(x, kernel, strides, padding, grad, matmul):
    y, vjp = jax.vjp(lambda x, k: layers.mixed_conv(
        x, k, strides, padding, dimension_numbers=DIMENSIONS, matmul=matmul), x, kernel)
    return y, *vjp(grad)


@pytest.mark.slow
@pytest.mark.parametrize("matmul", [False, True], ids=["xla", "matmul"])
def test_mixed_conv_float32_gradients_equal_jax_grad(matmul):
    for size, stride, map_size in CONVS:
        case = _conv_case(size, stride, map_size, jnp.float32)
        expected, got = _plain_vjp(*case), _mixed_vjp(*case, matmul)
        for name, e, g in zip(("output", "input gradient", "kernel gradient"), expected, got):
            assert g.dtype == e.dtype == jnp.float32, name
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=f"{name} {size, stride, map_size}")


@pytest.mark.slow
@pytest.mark.parametrize("matmul", [False, True], ids=["xla", "matmul"])
def test_mixed_conv_bfloat16_kernel_gradient_is_float32(matmul):
    # The bfloat16 output and input gradient of nnx's convolution; the kernel gradient summed in
    # float32 and left there, so closer to the float32 computation than nnx's bfloat16 one for
    # every shape.
    for size, stride, map_size in CONVS:
        x, kernel, strides, padding, grad = case = _conv_case(size, stride, map_size, jnp.bfloat16)
        y, dx, dk = _mixed_vjp(*case, matmul)
        y_old, dx_old, dk_old = _plain_vjp(*case)
        where = f"kernel {size}, stride {stride}, map {map_size}"
        assert y.dtype == dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32, where
        # (On a GPU each program may pick its own convolution algorithm: equal to rounding.)
        for new, old in ((y, y_old), (dx, dx_old)):
            new, old = np.asarray(new, np.float32), np.asarray(old, np.float32)
            assert np.linalg.norm(new - old) <= 1e-2 * np.linalg.norm(old), where
        # Float32 arithmetic on the same bfloat16 numbers.
        _, _, exact = _plain_vjp(x.astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32),
                                 strides, padding, grad.astype(jnp.float32))
        new_error = np.abs(np.asarray(dk) - np.asarray(exact)).max()
        old_error = np.abs(np.asarray(dk_old, np.float32) - np.asarray(exact)).max()
        assert new_error < 1e-3 * np.abs(np.asarray(exact)).max() and new_error < old_error / 4, (
            where, new_error, old_error)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["conv", "dense"])
def test_mixed_layers_output_compute_dtype_and_float32_gradients(layer):
    # VGG's layers: a strided convolution with a bias, a dense layer on a batch of sequences.
    # Outputs in bfloat16; kernel and bias gradients are the float32 layer's on the same
    # bfloat16 numbers, to float32 rounding (bfloat16 sums would be off by about 1e-3).
    def make(dtype):
        made = layers.make_layers(bn_momentum=0.9, bn_epsilon=1e-5, bn_group_size=None, dtype=dtype,
                                  param_dtype="float32", init_fan="fan_in", conv_weight_grad="xla")
        if layer == "conv":
            return made.conv(6, 5, 3, 2, nnx.Rngs(0), bias=0.5), (4, 9, 8, 6)
        return made.dense(24, 16, nnx.Rngs(0), bias_init=jax.nn.initializers.normal(1.0)), (4, 3, 24)

    (mixed, shape), (exact, _) = make("bfloat16"), make("float32")
    x = jax.random.normal(jax.random.key(0), shape).astype(jnp.bfloat16)
    y = mixed(x)
    assert type(mixed) is not type(exact) and y.dtype == jnp.bfloat16
    g = jax.random.normal(jax.random.key(1), y.shape).astype(jnp.bfloat16)

    def loss(module, x):
        return (module(x).astype(jnp.float32) * g.astype(jnp.float32)).sum()

    got, expected = nnx.grad(loss)(mixed, x), nnx.grad(loss)(exact, x.astype(jnp.float32))
    for name in ("kernel", "bias"):
        e, a = np.asarray(getattr(expected, name)[...]), np.asarray(getattr(got, name)[...])
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * np.abs(e).max(), err_msg=name)
    np.testing.assert_allclose(np.asarray(y, np.float32), exact(x.astype(jnp.float32)), rtol=2e-2, atol=5e-2)


# The train step in bfloat16 on 8 simulated CPU devices, the batch sharded (JAX_PLATFORMS=cpu: on
# a GPU machine too), with GPU/TPU convolutions: lowered for TPU and CUDA, and compiled on the CPU
# up to XLA's SPMD partitioner, where the all-reduces appear. argv: model name, options as JSON.
_STEP_MODULES = """
import json, sys
import jax
from flax import nnx
from benchmarks import collectives
jitted, arguments, network = collectives.step(sys.argv[1], 16, 32, "bfloat16", conv_weight_grad="xla",
                                              **json.loads(sys.argv[2]))
params = jax.tree.leaves(nnx.state(network, nnx.Param))
print(json.dumps({"kernels": [list(p.shape) for p in params if p.ndim == 4],
                  "parameters": sum(p.size for p in params),
                  "tpu": collectives.lowered(jitted, arguments, "tpu"),
                  "cuda": collectives.lowered(jitted, arguments, "cuda"),
                  "partitioned": collectives.partitioned(jitted, arguments)}))
"""
_STABLEHLO_CONV = re.compile(r"stablehlo\.convolution.*:\s*\(tensor<[^>]*>, tensor<[^>]*>\)\s*->\s*"
                             r"tensor<([\dx]+)x(\w+)>")


def _step_modules(model: str, **options) -> dict:
    env = environment(devices=8, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
    out = subprocess.run([sys.executable, "-c", _STEP_MODULES, model, json.dumps(options)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def step_modules():
    return _step_modules("cifar_resnet8")


def _assert_gradients_all_reduced_in_float32(modules: dict) -> None:
    reduced = collectives.all_reduces(modules["partitioned"])
    assert reduced and not [r for r in reduced if r[0] in ("bf16", "f16")], reduced
    # One float32 all-reduce per convolution kernel, of its shape; every parameter's gradient in
    # a float32 one (with BN's statistics and the metrics' sums beside them).
    assert sorted(shape for _, shape in reduced if len(shape) == 4) == sorted(
        tuple(shape) for shape in modules["kernels"])
    assert {dtype for dtype, shape in reduced if len(shape) == 4} == {"f32"}
    assert collectives.by_dtype(reduced)["f32"]["bytes"] >= 4 * modules["parameters"]


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowered_kernel_gradients_are_float32(step_modules, platform):
    # A convolution whose result has a kernel's shape is that kernel's gradient: each in float32
    # before the partitioner sums it over the devices.
    kernels = {tuple(shape) for shape in step_modules["kernels"]}
    results = collections.defaultdict(set)
    for shape, dtype in _STABLEHLO_CONV.findall(step_modules[platform]):
        dims = tuple(int(d) for d in shape.split("x"))
        if dims in kernels:
            results[dims].add(dtype)
    assert results.keys() == kernels, (sorted(kernels), dict(results))
    assert all(dtypes == {"f32"} for dtypes in results.values()), dict(results)


@pytest.mark.slow
def test_partitioned_step_all_reduces_no_bfloat16(step_modules):
    _assert_gradients_all_reduced_in_float32(step_modules)


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_classifier_at_highest_precision(step_modules, platform):
    # The classifier is the step's only matrix product (forward, and the two of its gradient):
    # DEFAULT would make it TF32 on GPUs and one-pass bfloat16 on TPUs.
    dots = [line for line in step_modules[platform].splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) >= 3, dots
    for line in dots:
        assert "precision = [HIGHEST, HIGHEST]" in line, line


@pytest.mark.slow
def test_vgg_step_all_reduces_no_bfloat16():
    # VGG's convolutions have biases and its hidden dense layers compute in bfloat16: their
    # kernels' and biases' gradients are float32 too; its classifier is float32 at HIGHEST.
    modules = _step_modules("vgg16_bn", width=4)
    _assert_gradients_all_reduced_in_float32(modules)
    dots = [line for line in modules["tpu"].splitlines() if "stablehlo.dot_general" in line]
    assert all(("precision = [HIGHEST, HIGHEST]" in line) == ("xbf16>" not in line) for line in dots), dots
