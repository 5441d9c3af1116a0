"""benchmarks/collectives.py at a tiny size: the train step's all-reduces by dtype, both BN ways."""

import json
import subprocess
import sys

import jax
import pytest
from flax import nnx

from benchmarks import collectives
from resnet_jax import models
from runs import REPO, environment


def _parameters(name: str) -> int:
    network = nnx.eval_shape(lambda: models.create(name, num_classes=10, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(network, nnx.Param)))


@pytest.mark.slow
def test_counts_all_reduces_by_dtype_for_both_bn_settings():
    # A fresh process: the 8 simulated devices must reach XLA before JAX starts (the script
    # sets them itself when run as a program).
    env = environment(JAX_ENABLE_COMPILATION_CACHE="false")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.collectives", "--model", "cifar_resnet8", "--batch-size", "16",
         "--image-size", "8", "--bn-group-size", "none", "2", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    whole, groups = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert (whole["bn_group_size"], groups["bn_group_size"]) == (None, 2)
    for result in (whole, groups):
        assert result["devices"] == 8 and result["dtype"] == "bfloat16"
        # The gradient of every parameter is summed in float32; nothing in bfloat16.
        assert set(result["all_reduces"]) <= {"f32", "s32", "pred"}, result
        assert result["all_reduces"]["f32"]["bytes"] >= 4 * _parameters("cifar_resnet8")
        assert result["count"] == sum(row["count"] for row in result["all_reduces"].values())
    # Over the whole batch each of the 7 BNs sums its statistics across the devices (a [2, 1,
    # channels] all-reduce): groups on one device sum only their scale and bias gradients.
    assert whole["all_reduces"]["f32"]["bytes"] > groups["all_reduces"]["f32"]["bytes"]


def test_reads_all_reduces_off_hlo_text():
    hlo = "\n".join([
        "  %all-reduce.14 = bf16[3,3,3,16]{3,2,1,0} all-reduce(bf16[3,3,3,16]{3,2,1,0} %convolution.11), channel_id=15",
        "  %ars = (f32[10]{0}, s32[]) all-reduce-start(%a, %b), to_apply=%add",
        "  %ard = (f32[10]{0}, s32[]) all-reduce-done(%ars)",
        "  %ag = f32[8]{0} all-gather(f32[4]{0} %x), dimensions={0}",
    ])
    reduced = collectives.all_reduces(hlo)
    assert reduced == [("bf16", (3, 3, 3, 16)), ("f32", (10,)), ("s32", ())]
    assert collectives.by_dtype(reduced) == {"bf16": {"count": 1, "bytes": 864},
                                             "f32": {"count": 1, "bytes": 40},
                                             "s32": {"count": 1, "bytes": 4}}


@pytest.mark.parametrize("argv, message", [
    (["--bn-group-size", "x"], "--bn-group-size takes 'none' or positive integers"),
    (["--batch-size", "0"], "must be positive"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit) as error:
        collectives.parse_args(argv)
    assert message in str(error.value) and "\n" not in str(error.value)
