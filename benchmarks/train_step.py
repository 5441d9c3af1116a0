"""Compile time, step time, FLOP rate, memory and collectives of the train and eval steps.

    python -m benchmarks.train_step --model resnet50 --batch-size 16 --image-size 224 \\
        --dtype auto [--steps N] [--devices N] [--scan-blocks] [--remat] [--json] \\
        [--bn-group-size N] [--stride-on 1x1|3x3] [--cache-dir DIR]

The steps are those of `resnet_jax.train` (train_step, eval_step, TrainState, the optimizer of
configs/default.py, the mesh of `sharding`), jitted the same way, on random images placed on
the devices once: the input pipeline is not measured here (see benchmarks/train_loop.py).

compile_seconds is trace + lower + compile of the train step; step_seconds the median of the
timed steps after one warm-up step; tflops_per_second counts `flops.count_macs` x 2 FLOPs x 3
(forward and backward) per image; peak_memory_bytes is the compiled step's memory analysis
(arguments + outputs - donated + temporaries); all_reduce_count and all_reduce_bytes are read off
the compiled HLO, as one step executes them (a loop's once per iteration). The eval_* keys are
the same for the eval step (forward only: x 1).
`--devices N` simulates N CPU devices (XLA_FLAGS, set before JAX starts); `--cache-dir` turns
on JAX's persistent compilation cache in DIR, so that a second run of the same shapes reads
the compiled step from it.
"""

import os
import sys


def _requested_devices(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--devices="):
            value = arg.split("=", 1)[1]
        else:
            continue
        return int(value) if value.isdigit() and int(value) > 0 else None
    return None


# XLA reads its flags once, when JAX starts its CPU backend: set them before jax is imported.
_DEVICES = _requested_devices(sys.argv[1:]) if __name__ == "__main__" else None
if _DEVICES and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        + [f"--xla_force_host_platform_device_count={_DEVICES}"])
from resnet_jax import cpu  # noqa: E402

cpu.set_cpu_fusion()  # as the main job runs

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import cli, compile_timer  # noqa: E402
from configs import default  # noqa: E402
from resnet_jax import flops, layers
from resnet_jax.distributed import sharding
from resnet_jax.training import losses, metrics, optim, steps  # noqa: E402

# Bytes per element of the HLO element types that collectives carry.
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
              "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"=\s*(.*?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_HLO_BYTES) + r")\[([\d,]*)\]")
# A computation's first line, "ENTRY %name (" or "%name (", and what an instruction calls.
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(")
_WHILE_BODY = re.compile(r"\swhile\(.*?\bbody=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLED = re.compile(r"\bcalls=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.OneLineParser(prog="python -m benchmarks.train_step",
                               description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="a name of resnet_jax.models.create")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="auto",
                        help="compute dtype, as model.dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps after one warm-up step; 0 compiles only")
    parser.add_argument("--devices", type=int, default=None, help="simulate this many CPU devices")
    parser.add_argument("--scan-blocks", action="store_true")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--conv-weight-grad", default="auto", choices=("auto", "xla", "matmul"),
                        help="how convolution kernel gradients are computed (models.ResNet)")
    parser.add_argument("--bn-group-size", type=int, default=None)
    parser.add_argument("--stride-on", default=None, choices=("1x1", "3x3"),
                        help="ImageNet bottlenecks: the paper's 1x1 (default) or torchvision's 3x3")
    parser.add_argument("--num-classes", type=int, default=None, help="default 10 for CIFAR nets, else 1000")
    parser.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache directory")
    parser.add_argument("--no-eval", action="store_true", help="skip the eval step")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    for field in ("batch_size", "image_size", "steps", "devices", "bn_group_size", "num_classes"):
        value = getattr(args, field)
        if value is not None and value < (0 if field == "steps" else 1):
            parser.error(f"--{field.replace('_', '-')} must be a positive integer; got {value}")
    return args


def collectives(hlo_text: str) -> dict[str, Any]:
    """Count and bytes (of the results) of each kind of collective that one run of an HLO module
    executes, from its text.

    A collective inside a while loop with a known trip count counts that many times: a scanned
    stage's gradients are all-reduced inside the backward loop, once per block. An asynchronous
    pair (all-reduce-start / all-reduce-done) counts once, at its start.
    """
    own: dict[str, dict[str, list[int]]] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    entry = name = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            name = header.group(2)
            own[name], calls[name] = {kind: [0, 0] for kind in _COLLECTIVES}, []
            entry = name if header.group(1) else entry
            continue
        if name is None:
            continue
        match = _INSTRUCTION.search(line)
        if match is not None:
            shape, kind = match.group(1), match.group(2)
            own[name][kind][0] += 1
            own[name][kind][1] += sum(_HLO_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
                                      for dtype, dims in _ARRAY.findall(shape))
        body, trips = _WHILE_BODY.search(line), _TRIP_COUNT.search(line)
        if body is not None:
            calls[name].append((body.group(1), int(trips.group(1)) if trips else 1))
        calls[name] += [(callee, 1) for callee in _CALLED.findall(line)]
        for branches in _BRANCHES.findall(line):  # both branches of a conditional: at most
            calls[name] += [(callee.strip().lstrip("%"), 1) for callee in branches.split(",")]

    @functools.cache
    def executed(computation: str) -> dict[str, tuple[int, int]]:
        total = {kind: tuple(counts) for kind, counts in own.get(computation, {}).items()}
        for callee, times in calls.get(computation, []):
            for kind, (count, size) in executed(callee).items():
                total[kind] = (total[kind][0] + times * count, total[kind][1] + times * size)
        return total

    found = executed(entry) if entry else {}
    result = {}
    for kind in _COLLECTIVES:
        name = kind.replace("-", "_")
        result[f"{name}_count"], result[f"{name}_bytes"] = found.get(kind, (0, 0))
    return result


def memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {"peak_memory_bytes": -1}
    # Arguments and outputs live at once, less the donated buffers reused for outputs, plus the
    # temporaries (activations kept for the backward pass among them).
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
    return {"peak_memory_bytes": int(peak), "temp_memory_bytes": int(stats.temp_size_in_bytes),
            "argument_memory_bytes": int(stats.argument_size_in_bytes),
            "xla_peak_memory_bytes": int(getattr(stats, "peak_memory_in_bytes", 0))}


def _bind_train_step(values: dict[str, Any]):
    """steps.train_step with every argument but (state, batch) bound, by name; those with a
    default (mixing, ...) at it unless given."""
    parameters = inspect.signature(steps.train_step).parameters
    missing = [n for n, p in parameters.items()
               if n not in ("state", "batch") and n not in values and p.default is p.empty]
    if missing:
        raise SystemExit(f"error: steps.train_step takes {missing[0]!r}, which this harness does not know")
    bound = {n: values[n] for n in parameters if n in values}

    def step(state, batch):
        return steps.train_step(**bound, state=state, batch=batch)

    return step


def _initial_state(params, model_state, tx) -> steps.TrainState:
    """A TrainState at step 0, as loop.train_and_evaluate makes it; each field by name."""
    known = {
        "step": lambda: jnp.zeros((), jnp.int32), "params": lambda: params,
        "model_state": lambda: model_state, "opt_state": lambda: tx.init(params),
        "train_metrics": lambda: metrics.TrainMetrics.empty(),
        "skipped": lambda: jnp.zeros((), jnp.int32), "warmed_up": lambda: jnp.asarray(True),
        "device_stats": lambda: None, "ema": lambda: None}
    fields = [f.name for f in dataclasses.fields(steps.TrainState)]
    unknown = [name for name in fields if name not in known]
    if unknown:
        raise SystemExit(f"error: steps.TrainState has a field {unknown[0]!r} this harness does not know")
    return steps.TrainState(**{name: known[name]() for name in fields})


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds, compiles and times the steps; returns the results as a flat dict."""
    if args.devices and jax.device_count() != args.devices:
        raise SystemExit(f"error: --devices {args.devices} asked, but JAX started with "
                         f"{jax.device_count()} devices (it was imported before the flag was set)")
    if args.cache_dir:
        compile_timer.use_persistent_cache(args.cache_dir)
    cache_files = len(os.listdir(args.cache_dir)) if args.cache_dir else 0

    config = default.get_config()
    # The network as `models.create` makes it by name (CIFAR nets: width 16, option A), with the
    # options the flags set; the rest of the config (optimizer, schedule) is the default's.
    config.model = ml_collections.ConfigDict(dict(
        name=args.model, dtype=args.dtype, scan_blocks=args.scan_blocks, remat=args.remat,
        bn_group_size=args.bn_group_size, conv_weight_grad=args.conv_weight_grad,
        **({"stride_on": args.stride_on} if args.stride_on else {})))
    config.train.batch_size = args.batch_size
    num_classes = args.num_classes or (10 if args.model.startswith("cifar") else 1000)
    try:
        sharding.per_process_batch(args.batch_size, "--batch-size")
        model = steps.create_model(config, num_classes)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    per_device = args.batch_size // jax.device_count()
    if args.bn_group_size and per_device % args.bn_group_size:
        raise SystemExit(f"error: --bn-group-size {args.bn_group_size} must divide the per-device "
                         f"batch {per_device}")

    mesh = sharding.make_mesh()
    replicated, batch_spec = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    steps_per_epoch = 1000
    schedule = optim.learning_rate_schedule(config.schedule, steps_per_epoch, args.batch_size,
                                            steps_per_epoch * 100)
    tx = optim.create_optimizer(config.optimizer, schedule)
    graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
    macs = flops.count_macs(model, args.image_size)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    state = steps.for_training(jax.device_put(_initial_state(params, model_state, tx), replicated),
                               mesh, args.bn_group_size)
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
    stat_bytes = sum(s.nbytes for s in jax.tree.leaves(model_state))

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, args.image_size, args.image_size, model.in_channels),
                                 np.float32)
    labels = rng.integers(0, num_classes, args.batch_size).astype(np.int32)
    batch = jax.device_put({"image": images, "label": labels}, batch_spec)

    train_fn = jax.jit(_bind_train_step({
        "graphdef": graphdef, "tx": tx, "schedule": schedule,
        "loss": losses.from_config(config.train),
        "skip_nonfinite": config.train.get("skip_nonfinite", False),
        "warmup_lr": None}),  # the schedule's rate: the step after any warm-up
        in_shardings=(state_shardings, batch_spec), out_shardings=(state_shardings, replicated),
        donate_argnums=0)
    compiled, compile_times = compile_timer.timed_compile(train_fn, state, batch)
    holder = [state]

    def train_call():
        holder[0], *rest = compiled(holder[0], batch)
        return holder[0], rest

    step_times = compile_timer.time_steps(train_call, args.steps)
    step_seconds = statistics.median(step_times)
    result = {
        "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
        "dtype": str(layers.compute_dtype(args.dtype)), "devices": jax.device_count(), "platform": jax.devices()[0].platform,
        "scan_blocks": args.scan_blocks, "remat": args.remat, "bn_group_size": args.bn_group_size,
        "conv_weight_grad": args.conv_weight_grad, "stride_on": args.stride_on,
        "steps": args.steps, "cache_dir": args.cache_dir, "cache_files_before": cache_files,
        "params": flops.count_params(model), "param_bytes": param_bytes,
        "batch_stat_bytes": stat_bytes, "macs_per_image": macs,
        **compile_times,
        "step_seconds": step_seconds, "step_seconds_min": min(step_times),
        "step_seconds_max": max(step_times),
        "images_per_second": args.batch_size / step_seconds,
        "tflops_per_second": macs * 2 * 3 * args.batch_size / step_seconds / 1e12,
        **memory(compiled), **collectives(compiled.as_text()),
    }
    if not args.no_eval:
        eval_batch = jax.device_put({**{"image": images, "label": labels},
                                     "mask": np.ones(args.batch_size, bool)}, batch_spec)
        eval_fn = jax.jit(lambda state, batch: steps.eval_step(eval_graphdef, state, batch),
                          in_shardings=(replicated, batch_spec), out_shardings=replicated)
        eval_state = steps.for_evaluation(holder[0], mesh, args.bn_group_size)
        eval_compiled, eval_times = compile_timer.timed_compile(eval_fn, eval_state, eval_batch)
        times = compile_timer.time_steps(lambda: eval_compiled(eval_state, eval_batch), args.steps)
        eval_seconds = statistics.median(times)
        result.update({f"eval_{k}": v for k, v in {
            **eval_times, "step_seconds": eval_seconds, "step_seconds_min": min(times),
            "step_seconds_max": max(times), "images_per_second": args.batch_size / eval_seconds,
            "tflops_per_second": macs * 2 * args.batch_size / eval_seconds / 1e12,
            **memory(eval_compiled), **collectives(eval_compiled.as_text())}.items()})
    return result


def table(result: dict[str, Any]) -> str:
    head = (f"{result['model']}, batch {result['batch_size']}, {result['image_size']}px, "
            f"{result['dtype']}, {result['devices']} {result['platform']} device(s), "
            f"scan_blocks={result['scan_blocks']}, remat={result['remat']}, "
            f"bn_group_size={result['bn_group_size']}, conv_weight_grad={result['conv_weight_grad']}")
    rows = [("", "train", "eval")]

    def row(label, key, fmt):
        rows.append((label, fmt(result[key]), fmt(result[f"eval_{key}"]) if f"eval_{key}" in result else "-"))

    def seconds(value):
        return "-" if value is None else f"{value:.3f} s"

    row("compile (trace+lower+compile)", "compile_seconds", seconds)
    phases = ("trace_seconds", "lower_seconds", "backend_compile_seconds")
    if phases[0] in result:
        train_phases = " / ".join(f"{result[k]:.2f}" for k in phases) + " s"
    else:  # --step-dir: timed whole
        train_phases = "loaded" if result["step_loaded"] else "compiled and kept"
    rows.append(("  trace / lower / backend", train_phases,
                 " / ".join(f"{result['eval_' + k]:.2f}" for k in phases) + " s"
                 if "eval_trace_seconds" in result else "-"))
    row("step (median)", "step_seconds", seconds)
    row("images/s", "images_per_second", lambda v: "-" if v is None else f"{v:.2f}")
    row("TFLOP/s", "tflops_per_second", lambda v: "-" if v is None else f"{v:.4f}")
    row("peak memory", "peak_memory_bytes", lambda v: f"{v / 2**20:.1f} MiB")
    row("all-reduces", "all_reduce_count", str)
    row("all-reduce bytes", "all_reduce_bytes", lambda v: f"{v:,}")
    width = max(len(r[0]) for r in rows)
    lines = [head] + [f"{a:<{width}}  {b:>24}  {c:>24}" for a, b, c in rows]
    lines.append(f"parameters {result['params']:,} ({result['param_bytes']:,} bytes), "
                 f"{result['macs_per_image']:,} multiply-adds per image")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    # With --steps 0 the step keys are NaN: null in the JSON.
    result = {k: None if isinstance(v, float) and v != v else v for k, v in result.items()}
    print(json.dumps(result) if args.json else table(result), flush=True)
    return result


if __name__ == "__main__":
    main()
