"""Exact eval on 8 simulated devices: every one of 1,000 examples counted once (issue 3, 4)."""

import os
import subprocess
import sys

from runs import REPO

PROGRAM = r"""
import functools, jax, ml_collections, numpy as np
from flax import nnx
from resnet_jax import data, metrics, models, sharding, train
assert jax.device_count() == 8
config = ml_collections.ConfigDict(dict(
    data=dict(name="fake", image_size=8, train_preprocess="none", eval_preprocess="none",
              num_classes=10, fake_num_train=64, fake_num_eval=1000, mean=(0., 0., 0.),
              std=(1., 1., 1.)),
    eval=dict(batch_size=64)))
model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
model.eval()
graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
state = train.TrainState(step=0, params=params, batch_stats=stats, opt_state=(), train_metrics=None,
                         skipped=0)
mesh = sharding.make_mesh()
spec = sharding.batch_sharding(mesh)
eval_fn = jax.jit(functools.partial(train.eval_step, graphdef), in_shardings=(None, spec))
total = None
for batch in sharding.prefetch(data.eval_iterator(config.data, batch_size=64), mesh):
    step = eval_fn(state, batch)
    total = step if total is None else total.merge(step)
images, labels = [], []
for batch in data.eval_iterator(config.data, batch_size=64):
    images.append(batch["image"][batch["mask"]]); labels.append(batch["label"][batch["mask"]])
images, labels = np.concatenate(images), np.concatenate(labels)
correct = int((np.asarray(model(images)).argmax(-1) == labels).sum())
print("COUNT", int(total.accuracy.count), "CORRECT", round(float(total.accuracy.total)), correct,
      "UNIQUE", len(np.unique(images.reshape(len(images), -1), axis=0)))
"""


def test_eight_devices_count_each_eval_example_once():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("COUNT"))
    _, count, _, counted_correct, direct_correct, _, unique = line.split()
    assert int(count) == 1000 and int(unique) == 1000  # 16 batches, the last padded with 24
    assert counted_correct == direct_correct
