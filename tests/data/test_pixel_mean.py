"""The ImageNet recipe's per-pixel mean (Sec. 3.4) in a run: made once from the training split,
stored in the workdir, reused by the next run; with multi-scale testing in the same run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx
from PIL import Image

from resnet_jax.data import pipeline
from resnet_jax.distributed import sharding
from resnet_jax.run import jsonl
from resnet_jax.training import evaluation, loop, steps
from runs import REPO, environment, small_config

pytestmark = pytest.mark.slow  # every test here takes seconds: none is in the fast tier

# ImageNet's variety of aspect ratios, small: 4:3, 3:4, 1:1, 2:1 and beyond.
SHAPES = ((15, 20), (20, 15), (16, 16), (12, 24), (30, 10), (18, 27))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Smooth random PNGs of assorted SHAPES: 24 train and 7 test images in 3 classes (two
    processes' slices of the test split hold 3 and 4 shape classes)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 7)):
        for i in range(n):
            directory = root / split / "abc"[i % 3]
            os.makedirs(directory, exist_ok=True)
            h, w = SHAPES[i % len(SHAPES)]
            small = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
            small.resize((w, h), Image.BILINEAR).save(directory / f"{i}.png")
    return root


def _config(photos, steps):
    return small_config(**{
        "data.name": f"imagefolder:{photos}", "data.num_classes": 3, "data.image_size": 8,
        "data.train_preprocess": "paper", "data.scale_range": (10, 16),
        "data.eval_preprocess": "multi_scale", "data.eval_scales": (8, 12),
        "data.subtract_pixel_mean": True, "data.dtype": "float32", "train.batch_size": 8,
        "train.num_steps": steps, "eval.every_steps": 2, "checkpoint.every_steps": 2})


def test_a_run_stores_the_pixel_mean_and_the_next_run_reuses_it(photos, tmp_path, monkeypatch):
    loop.train_and_evaluate(_config(photos, 2), str(tmp_path))
    (stored,) = tmp_path.glob("pixel_mean_*.npy")
    resized = [tf.image.resize(np.asarray(Image.open(path)), (8, 8)).numpy()
               for path in sorted((photos / "train").glob("*/*.png"))]
    np.testing.assert_allclose(np.load(stored), np.mean(resized, axis=0), atol=1e-4)

    # A new process's start: nothing made yet, and the training split not to be read again.
    monkeypatch.setattr(pipeline, "_PIXEL_MEANS", {})
    def unexpected(*args, **kwargs):
        raise AssertionError("the stored mean image was not reused")
    monkeypatch.setattr(pipeline, "pixel_mean_sums", unexpected)
    loop.train_and_evaluate(_config(photos, 3), str(tmp_path), allow_config_change=True)
    np.testing.assert_array_equal(pipeline.pixel_mean(_config(photos, 3).data), np.load(stored))
    evals = [row for row in jsonl.read_rows(tmp_path) if "eval_accuracy" in row]
    assert [row["step"] for row in evals] == [2, 3]
    assert all(0 <= row["eval_accuracy"] <= 1 and np.isfinite(row["eval_loss"]) for row in evals)


# Two processes of two devices each, as a pod runs: the mean image made from both processes'
# slices and the multi-scale counts summed over both, against one process.
TWO_PROCESSES = r"""
import json, sys, jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
from etils import epath
from resnet_jax.data import pipeline, pixel_mean
from resnet_jax.distributed import sharding
from resnet_jax.training import evaluation
sys.path[:0] = ["tests", "tests/data"]
from test_pixel_mean import _config, evaluate
config = _config(sys.argv[3], 2)
pixel_mean.load(config, epath.Path(sys.argv[4]))
batches = len(list(pipeline.multi_scale_iterator(config.data, batch_sizes=evaluation.eval_batch_size(config),
                                             process_index=jax.process_index(), process_count=2)))
print("STEPS", batches)
print("RESULT", json.dumps(dict(mean=pipeline.pixel_mean(config.data).tolist(),
                                eval=evaluate(config, sharding.make_mesh()))))
"""


def evaluate(config, mesh):
    """The multi-scale eval of a new network (seed 0) over `mesh`."""
    model = steps.create_model(config, 3)
    model.eval()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = jax.device_put(steps.TrainState(step=0, params=params, model_state=stats,
                                            opt_state=(), train_metrics=None, skipped=0),
                           sharding.replicated(mesh))
    return evaluation.evaluate(evaluation.eval_function(graphdef, config, mesh), state, config, mesh)


def test_two_processes_make_the_same_mean_and_counts_as_one(photos, tmp_path):
    port = 20000 + os.getpid() % 20000
    (tmp_path / "pod").mkdir()  # the workdir, as a run makes it before its first step
    env = environment(devices=2)
    processes = [subprocess.Popen(
        [sys.executable, "-c", TWO_PROCESSES, f"localhost:{port}", str(i), str(photos),
         str(tmp_path / "pod")], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    results = [json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
               for out in outputs]
    steps = [next(int(line[6:]) for line in out.splitlines() if line.startswith("STEPS ")) for out in outputs]
    assert steps[0] != steps[1]  # the multi-scale steps of one process wait for no other's
    assert results[0] == results[1]  # the same on every host
    assert len(list((tmp_path / "pod").glob("pixel_mean_*.npy"))) == 1

    config = _config(photos, 2)
    pipeline.pixel_mean(config.data)  # this process: the whole split at once
    np.testing.assert_allclose(results[0]["mean"], pipeline.pixel_mean(config.data), atol=1e-4)
    one = evaluate(config, sharding.make_mesh())
    assert results[0]["eval"]["eval_accuracy"] * 7 == pytest.approx(one["eval_accuracy"] * 7)
    assert results[0]["eval"]["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
