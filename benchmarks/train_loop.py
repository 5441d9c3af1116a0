"""The train step fed by the real input pipeline: how much of each step waits for data.

    python -m benchmarks.train_loop --model resnet50 --batch-size 16 --image-size 224 \\
        --data fake [--preprocess paper] [--steps N] [--data-dir DIR] [--json]

Batches come from `pipeline.train_iterator` through `sharding.prefetch` (host batch -> global array,
two batches made ahead on a thread), as in `loop.train_and_evaluate`; the step is the one
`benchmarks.train_step` builds from `steps.train_step`. After one warm-up step (the compile),
each step is timed in two parts: waiting for `next(batches)`, and the step itself to
completion. `data_wait_fraction` is the waiting time over the total.
"""

import argparse
import json
import statistics
import sys
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from benchmarks import train_step as harness
from configs import default
from resnet_jax.data import pipeline, sources
from resnet_jax.distributed import sharding
from resnet_jax.training import losses, optim, steps


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = harness._Parser(prog="python -m benchmarks.train_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--data", default="fake", help=sources.NAMES)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--preprocess", default=None, help="train preprocessing; default: the config's")
    parser.add_argument("--scan-blocks", action="store_true")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for field in ("batch_size", "image_size", "steps"):
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be a positive integer; got {getattr(args, field)}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = default.get_config()
    config.model = ml_collections.ConfigDict(dict(
        name=args.model, dtype=args.dtype, scan_blocks=args.scan_blocks, remat=args.remat))
    config.data.name = args.data
    config.data.data_dir = args.data_dir
    config.data.image_size = args.image_size
    config.data.num_classes = None  # the data set's own count (fake data: 1,000)
    config.data.eval_split = config.data.train_split  # nothing is evaluated; any folder will do
    if args.preprocess:
        config.data.train_preprocess = args.preprocess
    try:
        batch_size = sharding.per_process_batch(args.batch_size, "--batch-size")
        info = pipeline.info(config.data)
        model = steps.create_model(config, info.num_classes)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None

    mesh = sharding.make_mesh()
    replicated, batch_spec = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    schedule = optim.learning_rate_schedule(config.schedule, 1000, args.batch_size, 100_000)
    tx = optim.create_optimizer(config.optimizer, schedule)
    graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = jax.device_put(harness._initial_state(params, model_state, tx), replicated)
    step_fn = jax.jit(steps.with_inputs(harness._bind_train_step({
        "graphdef": graphdef, "tx": tx, "schedule": schedule,
        "loss": losses.from_config(config.train),
        "skip_nonfinite": config.train.get("skip_nonfinite", False)}), config.data),
        in_shardings=(replicated, batch_spec), out_shardings=replicated, donate_argnums=0)

    batches = sharding.prefetch(pipeline.train_iterator(
        config.data, batch_size=batch_size, seed=0, process_index=jax.process_index(),
        process_count=jax.process_count()), mesh)
    began = time.perf_counter()
    state, *_ = step_fn(state, next(batches))
    jax.block_until_ready(state)
    first = time.perf_counter() - began
    waits, totals = [], []
    for _ in range(args.steps):
        began = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        state, *_ = step_fn(state, batch)
        jax.block_until_ready(state)
        waits.append(got - began)
        totals.append(time.perf_counter() - began)
    total = statistics.median(totals)
    return {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
            "data": args.data, "preprocess": config.data.train_preprocess,
            "devices": jax.device_count(), "steps": args.steps,
            "first_step_seconds": first, "step_seconds": total,
            "data_wait_seconds": statistics.median(waits),
            "data_wait_fraction": sum(waits) / sum(totals),
            "images_per_second": args.batch_size / total}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"{result['model']}, batch {result['batch_size']}, {result['image_size']}px, data "
              f"{result['data']} ({result['preprocess']}), {result['devices']} device(s)\n"
              f"step {result['step_seconds']:.3f} s (median of {result['steps']}), "
              f"{result['images_per_second']:.2f} images/s; waiting for data "
              f"{result['data_wait_seconds']:.3f} s a step, {100 * result['data_wait_fraction']:.1f}% "
              f"of step time; first step (compile) {result['first_step_seconds']:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
