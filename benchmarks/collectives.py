"""The train step's all-reduces by dtype: how many, and how many bytes, per step.

    python -m benchmarks.collectives [--model resnet50] [--batch-size 256] [--image-size 224] \\
        [--dtype bfloat16] [--devices 8] [--bn-group-size none 32] [--json]

The step is `resnet_jax.training.steps.train_step` on simulated CPU devices with the batch sharded over
them, as `benchmarks.train_step` builds it, with the GPU/TPU convolutions (conv_weight_grad
"xla"); nothing runs. Compiled on the CPU, it is read right after XLA's SPMD partitioner, which
inserts the collectives, and before the CPU backend's own passes (the CPU cannot all-reduce
bfloat16 and promotes such all-reduces to float32; GPUs and TPUs keep them). Counts are of
all-reduce instructions before any combining, each run once per step: the networks here are
unscanned. `lowered` gives the StableHLO module JAX hands to a GPU or TPU compiler.
"""

import os
import sys

# XLA reads its flags once, when JAX starts its CPU backend: the device count goes in before jax
# is imported (under pytest, the test sets it for its subprocess).
if __name__ == "__main__" and "jax" not in sys.modules:
    _ARGS = sys.argv[1:]
    _COUNT = next((_ARGS[i + 1] for i, a in enumerate(_ARGS[:-1]) if a == "--devices"), "8")
    _COUNT = _COUNT if _COUNT.isdigit() else "8"  # a bad value: argparse says so later
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        + [f"--xla_force_host_platform_device_count={_COUNT}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # see `partitioned`

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from benchmarks import cli, train_step as harness  # noqa: E402
from configs import default  # noqa: E402
from resnet_jax.distributed import sharding
from resnet_jax.training import losses, optim, steps  # noqa: E402

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ALL_REDUCE = re.compile(r"=\s*(.*?)\s+all-reduce(?:-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def step(model: str, batch_size: int, image_size: int, dtype: str = "bfloat16",
         bn_group_size: int | None = None, conv_weight_grad: str = "xla",
         num_classes: int = 10, **options: Any) -> tuple[Callable, tuple, nnx.Module]:
    """(the jitted train step, its (state, batch) arguments, the network) on all devices, the
    state replicated and the batch sharded; the arguments abstract (shapes and placements), for
    lowering. `options`: more model options (`models.create`'s)."""
    config = default.get_config()
    config.model = ml_collections.ConfigDict(dict(
        name=model, dtype=dtype, bn_group_size=bn_group_size, conv_weight_grad=conv_weight_grad,
        **options))
    # Lowering needs no values: the network, its parameters and the optimizer state are shapes,
    # and only the small rest (BN statistics, rng state) is made, for `for_training` to place.
    network = nnx.eval_shape(lambda: steps.create_model(config, num_classes))
    graphdef, params, _ = nnx.split(network, nnx.Param, ...)  # `...`: VGG's rng state too
    rest = jax.jit(lambda: nnx.split(steps.create_model(config, num_classes), nnx.Param, ...)[2])()
    schedule = optax.constant_schedule(0.1)
    tx = optim.create_optimizer(config.optimizer, schedule)
    mesh = sharding.make_mesh()
    replicated, batch_spec = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    initial = jax.eval_shape(lambda params: harness._initial_state(params, rest, tx), params)
    state = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=(
            leaf.sharding if isinstance(getattr(leaf, "sharding", None), NamedSharding) else replicated)),
        steps.for_training(initial.replace(model_state=rest), mesh, bn_group_size))
    batch = {"image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, network.in_channels),
                                           jnp.float32, sharding=batch_spec),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_spec)}
    function = harness._bind_train_step({
        "graphdef": graphdef, "tx": tx, "schedule": schedule, "loss": losses.Loss(),
        "skip_nonfinite": False, "warmup_lr": None})
    shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    jitted = jax.jit(function, in_shardings=(shardings, batch_spec),
                     out_shardings=(shardings, replicated), donate_argnums=0)
    return jitted, (state, batch), network


def lowered(jitted: Callable, args: tuple, platform: str) -> str:
    """The StableHLO module of `jitted` for `platform` ("tpu", "cuda"), before any partitioning."""
    return jitted.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def partitioned(jitted: Callable, args: tuple) -> str:
    """The HLO module of `jitted` compiled on the CPU, as XLA's SPMD partitioner leaves it (the
    collectives in, nothing backend-specific yet). XLA writes it out while it compiles, so JAX's
    persistent compilation cache must be off (`jax_enable_compilation_cache`) from the start."""
    with tempfile.TemporaryDirectory() as folder:
        jitted.trace(*args).lower().compile(compiler_options={
            "xla_dump_to": folder, "xla_dump_hlo_as_text": True,
            "xla_dump_hlo_pass_re": "spmd-partitioning",
            # Nothing runs: the machine code need not be fast.
            "xla_backend_optimization_level": 0})
        found = sorted(pathlib.Path(folder).glob("*after_spmd-partitioning*.txt"))
        if not found:
            raise RuntimeError("XLA wrote no module after its SPMD partitioner: was the step "
                               "read from JAX's persistent compilation cache?")
        return found[-1].read_text()


def all_reduces(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every array that an all-reduce instruction of the module reduces."""
    found = []
    for line in hlo_text.splitlines():
        match = _ALL_REDUCE.search(line)
        if match:
            found += [(dtype, tuple(int(d) for d in dims.split(",") if d))
                      for dtype, dims in _ARRAY.findall(match.group(1))]
    return found


def by_dtype(reduced: list[tuple[str, tuple[int, ...]]]) -> dict[str, dict[str, int]]:
    """{dtype: {"count", "bytes"}} of `all_reduces`' arrays."""
    table = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for dtype, shape in reduced:
        size = 1
        for dim in shape:
            size *= dim
        table[dtype]["count"] += 1
        table[dtype]["bytes"] += _BYTES[dtype] * size
    return dict(table)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.OneLineParser(prog="python -m benchmarks.collectives",
                               description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype, as model.dtype")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--bn-group-size", nargs="+", default=["none", "32"],
                        help="BN settings to compare: 'none' (the whole batch) or a group size")
    parser.add_argument("--num-classes", type=int, default=None, help="default 10 for CIFAR nets, else 1000")
    parser.add_argument("--json", action="store_true", help="one JSON object per BN setting")
    args = parser.parse_args(argv)
    try:
        args.bn_group_size = [None if g == "none" else int(g) for g in args.bn_group_size]
    except ValueError:
        parser.error(f"--bn-group-size takes 'none' or positive integers; got {args.bn_group_size}")
    if any(g is not None and g < 1 for g in args.bn_group_size) or args.batch_size < 1:
        parser.error("--bn-group-size and --batch-size must be positive")
    return args


def measure(args: argparse.Namespace, bn_group_size: int | None) -> dict[str, Any]:
    if jax.device_count() != args.devices:
        raise SystemExit(f"error: --devices {args.devices} asked, but JAX started with "
                         f"{jax.device_count()} devices (it was imported before the flag was set)")
    start = time.perf_counter()
    num_classes = args.num_classes or (10 if args.model.startswith("cifar") else 1000)
    if args.batch_size % args.devices or (bn_group_size and args.batch_size // args.devices % bn_group_size):
        raise SystemExit(f"error: --batch-size {args.batch_size} must split into {args.devices} "
                         f"devices' batches that groups of --bn-group-size {bn_group_size} divide")
    try:
        jitted, arguments, _ = step(args.model, args.batch_size, args.image_size, args.dtype,
                                    bn_group_size, num_classes=num_classes)
        table = by_dtype(all_reduces(partitioned(jitted, arguments)))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
            "dtype": args.dtype, "devices": jax.device_count(), "bn_group_size": bn_group_size,
            "all_reduces": table, "count": sum(row["count"] for row in table.values()),
            "bytes": sum(row["bytes"] for row in table.values()),
            "seconds": round(time.perf_counter() - start, 1)}


def lines(result: dict[str, Any]) -> list[str]:
    bn = "whole batch" if result["bn_group_size"] is None else f"groups of {result['bn_group_size']}"
    head = (f"{result['model']}, batch {result['batch_size']}, {result['image_size']}px, "
            f"{result['dtype']}, {result['devices']} devices, BN over {bn}: "
            f"{result['count']} all-reduces, {result['bytes']:,} bytes ({result['seconds']} s)")
    return [head] + [f"  {dtype:>5}: {row['count']:4d} all-reduces, {row['bytes']:>13,} bytes"
                     for dtype, row in sorted(result["all_reduces"].items())]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = []
    for group in args.bn_group_size:
        result = measure(args, group)
        print(json.dumps(result) if args.json else "\n".join(lines(result)), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
