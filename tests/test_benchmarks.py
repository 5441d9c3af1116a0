"""The benchmarks run, at a tiny size; their numbers are not asserted, only their shape."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import train_step
from runs import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("compile_seconds", "step_seconds", "images_per_second", "tflops_per_second",
        "peak_memory_bytes")


@pytest.mark.slow
def test_harness_on_two_simulated_devices_reports_every_number():
    # A fresh process: --devices must reach XLA before JAX starts.
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--model", "cifar_resnet8", "--batch-size", "4",
         "--image-size", "8", "--steps", "1", "--devices", "2", "--scan-blocks", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    for key in KEYS:
        assert result[key] > 0 and result[f"eval_{key}"] > 0, key
    assert result["all_reduce_count"] >= 1 and result["all_reduce_bytes"] >= result["param_bytes"]
    assert result["macs_per_image"] > 0 and result["params"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("scan", [[], ["--scan-blocks"]])
def test_ghost_bn_adds_no_collective_to_the_gradients_all_reduce(scan):
    # Groups of 2 of the 2 examples per device: each device normalises and keeps its running
    # statistics alone, so the train step all-reduces the gradients (the parameters' bytes) and
    # the loss and metric scalars, nothing of BN's. Scanned, the gradients of each stage's
    # scanned blocks are all-reduced inside the backward loop, once per block.
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--model", "cifar_resnet20", "--batch-size", "16",
         "--image-size", "8", "--steps", "1", "--devices", "8", "--bn-group-size", "2", "--json", *scan],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    scalars = result["all_reduce_bytes"] - result["param_bytes"]
    assert 0 <= scalars < 64 < result["batch_stat_bytes"], result
    assert result["step_seconds"] > 0 and result["eval_step_seconds"] > 0


# The train step's all-reduces on 8 devices, compiled (no step run), for BN over the whole batch
# and over groups, with and without remat, remat as GPUs and TPUs run it and as the CPU runs it.
_ALL_REDUCES = """
import json, sys
from benchmarks import train_step
from resnet_jax import cpu
on_cpu = cpu.in_use
counts = {}
for name, options, accelerator in [("global", [], False), ("global_remat", ["--remat"], True),
                                   ("ghost", ["--bn-group-size", "2"], False),
                                   ("ghost_remat", ["--bn-group-size", "2", "--remat"], False),
                                   ("ghost_remat_accelerator", ["--bn-group-size", "2", "--remat"], True)]:
    cpu.in_use = (lambda: False) if accelerator else on_cpu
    result = train_step.main(["--model", "cifar_resnet8", "--batch-size", "16", "--image-size", "8",
                              "--steps", "0", "--devices", "8", *options])
    counts[name] = result["all_reduce_count"]
print(json.dumps(counts))
"""


@pytest.mark.slow
def test_bn_all_reduces_once_each_way_and_remat_adds_none():
    # CIFAR ResNet-8 has 7 BNs (the stem's, two in each of 3 blocks). Over the whole batch, each reduces its statistics in one
    # all-reduce in the forward pass and its two gradient sums in one in the backward pass,
    # beside what ghost BN's step has (the gradients, loss and metrics). Remat recomputes
    # from the kept statistics: no collective more.
    env = environment(devices=8)
    out = subprocess.run([sys.executable, "-c", _ALL_REDUCES], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["global"] == counts["ghost"] + 2 * 7, counts
    assert counts["global_remat"] == counts["global"], counts
    assert counts["ghost_remat"] == counts["ghost_remat_accelerator"] == counts["ghost"], counts


def test_collectives_are_read_off_the_hlo_once_per_execution():
    hlo = "\n".join([
        "HloModule jit_step, is_scheduled=true",
        "%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
        "  %ar.body = f32[8]{0} all-reduce(f32[8]{0} %g), replica_groups={}, to_apply=%add",
        "}",
        "%other (q: f32[2]) -> f32[2] {",
        "  %ar.never = f32[1000]{0} all-reduce(f32[1000]{0} %q), to_apply=%add",
        "}",
        "ENTRY %main (a: f32[64,3]) -> f32[64,3] {",
        "  %all-reduce.1 = f32[64,3]{1,0} all-reduce(f32[64,3]{1,0} %p), replica_groups={}",
        "  %ars = (f32[10]{0}, bf16[4]{0}) all-reduce-start(%a, %b), to_apply=%add",
        "  %ard = (f32[10]{0}, bf16[4]{0}) all-reduce-done(%ars)",
        "  %ag = f32[8]{0} all-gather(f32[4]{0} %x), dimensions={0}",
        '  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, '
        'backend_config={"known_trip_count":{"n":"5"}}',
        "}",
    ])
    found = train_step.collectives(hlo)
    # The loop body's all-reduce five times; %other is never called.
    assert found["all_reduce_count"] == 2 + 5
    assert found["all_reduce_bytes"] == 64 * 3 * 4 + 40 + 8 + 5 * 32
    assert found["all_gather_count"] == 1 and found["all_gather_bytes"] == 32


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet7"], "ImageNet depth"),
    (["--model", "nonsense"], "unknown model name"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--steps", "x"], "invalid int value"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit) as error:
        train_step.main(argv + ["--image-size", "8"])
    text = str(error.value)
    assert message in text and "\n" not in text


def test_conv_grad_benchmark_times_both_gradients():
    from benchmarks import conv_grad
    xla, ours = conv_grad.measure(2, 6, 3, 4, 3, 2, repeats=1)
    assert xla > 0 and ours > 0


@pytest.mark.parametrize("preprocess, dtype", [("inception", "uint8"), ("center", "float32")])
def test_input_pipeline_benchmark_on_generated_photos(tmp_path, preprocess, dtype):
    from benchmarks import input_pipeline, make_images
    make_images.main([str(tmp_path), "--count", "6", "--classes", "2"])
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(sizes) == 6 and min(sizes) > 20_000  # photo-sized files, not flat colour
    result = input_pipeline.run(input_pipeline.parse_args([
        "--data", f"imagefolder:{tmp_path}", "--preprocess", preprocess, "--batch-size", "4",
        "--image-size", "32", "--dtype", dtype, "--warmup", "1", "--batches", "3"]))
    assert result["images"] == 12 and result["dtype"] == dtype
    assert result["images_per_second"] > 0 and result["images_per_cpu_second"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_reference_step_compiles_and_scans_only_when_asked(scan, tmp_path):
    # A fresh process: --cpu-fusion must reach XLA before JAX starts its backend.
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.reference_step", "--batch-size", "2", "--image-size", "16",
         "--stages", "1,3", "--cpu-fusion", "--cache-dir", str(tmp_path / "cache"), "--json",
         *(["--scan-blocks", "--steps", "2"] if scan else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["compile_seconds"] >= result["backend_compile_seconds"] > 0
    assert (result["step_seconds"] > 0) if scan else ("step_seconds" not in result)
    # The second stage's two identical blocks: one loop forward and one backward when scanned.
    assert result["while_loops"] == (2 if scan else 0), result
    assert "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion" in result["xla_flags"]
    assert any(name.startswith("jit_train_step") for name in os.listdir(tmp_path / "cache"))


@pytest.mark.slow
def test_reference_step_is_resnet152_sized_and_scanning_changes_no_number():
    import jax
    from benchmarks import reference_step
    shapes = jax.eval_shape(lambda: reference_step.init(jax.random.key(0), (3, 8, 36, 3), 1000, False))
    assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == 60_192_808  # torchvision's resnet152
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    labels = jax.numpy.arange(4) % 5
    losses = {}
    for scan in (False, True):
        step = reference_step.make_train_step(scan, learning_rate=0.05)
        params = reference_step.init(jax.random.key(0), (1, 3), 5, scan)
        velocity = jax.tree.map(jax.numpy.zeros_like, params)
        losses[scan] = []
        for _ in range(4 if scan else 1):
            params, velocity, loss = step(params, velocity, images, labels)
            losses[scan].append(float(loss))
    # The same keys give the same blocks, stacked or not: the same first loss.
    assert abs(losses[True][0] - losses[False][0]) < 1e-4 * abs(losses[False][0]), losses
    assert losses[True][-1] < losses[True][0], losses  # four images, being fitted


@pytest.mark.parametrize("argv, message", [
    (["--stages", "3,x"], "argument --stages: must be positive integers"),
    (["--stages", "0"], "argument --stages: must be positive integers"),
    (["--image-size", "0"], "--image-size must be a positive integer"),
])
def test_reference_step_bad_input_is_one_line(argv, message):
    from benchmarks import reference_step
    with pytest.raises(SystemExit) as error:
        reference_step.parse_args(argv)
    text = str(error.value)
    assert message in text and "\n" not in text


@pytest.mark.slow
def test_host_metrics_times_the_gather_of_each_log_line_on_two_processes():
    out = subprocess.run([sys.executable, "-m", "benchmarks.host_metrics", "--calls", "3", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["processes"] == 2 and 0 < result["seconds_median"] <= result["seconds_max"]


@pytest.mark.slow
def test_finished_run_times_the_same_command_on_a_finished_workdir(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.finished_run", "--tries", "2", "--steps", "2",
                          "--workdir", str(tmp_path), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tries"] == 2 and 0 < result["seconds_min"] <= result["seconds_median"] <= result["seconds_max"]
    assert (tmp_path / "checkpoints" / "2").is_dir()  # the run it timed, in the given workdir


@pytest.mark.slow
@pytest.mark.parametrize("linen", [False, True])
def test_create_model_reports_the_seconds_and_compiles_of_a_first_creation(linen):
    out = subprocess.run([sys.executable, "-m", "benchmarks.create_model", "--model", "cifar_resnet8",
                          *(["--linen"] if linen else []), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] == "cifar_resnet8" and result["linen"] is linen and result["seconds"] > 0
    assert result["compiles"] >= 1 and result["compile_seconds"] > 0  # the draw, compiled once
