"""Compile and step time of a plain-JAX ResNet train step: the yardstick on the machine at hand.

    python -m benchmarks.reference_step [--scan-blocks] [--cpu-fusion] [--batch-size 8] \\
        [--image-size 224] [--stages 3,8,36,3] [--steps N] [--cache-dir DIR] [--json]

Issue 5 states its compile targets in seconds, measured on one machine with one JAX: a
plain-JAX ResNet-152 train step (batch 8, 224) compiled in 13.2 s unrolled and 6.2 s scanned,
and the Flax ImageNet example's in 17.9 s. Compile times move with the machine and with XLA's
version, their ratios far less (benchmarks/README.md, "Same-time references"). This is such a
step, written with nothing of resnet_jax's model or train step (it imports only the XLA flag):
parameters in a dict, `lax.conv_general_dilated`, batch normalisation by mean and variance of the
batch, softmax cross-entropy, SGD with momentum and weight decay by `jax.tree.map`; with
`--scan-blocks`, the identical blocks of each stage stacked and run by `lax.scan`. It is timed
as benchmarks/train_step.py times ours: trace, lower and backend compile, and with `--steps N`
the median of N steps after one warm-up step (step_seconds). `--cpu-fusion` sets
the XLA flag the main job and benchmarks/train_step.py set (`resnet_jax.cpu`); without it
XLA runs with its defaults.
"""

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

from benchmarks import cli, compile_timer
from resnet_jax import cpu

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv(x, kernel, stride=1):
    pad = (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=_DIMENSIONS)


def batch_norm(x, p):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def bottleneck(x, p, stride=1):
    y = jax.nn.relu(batch_norm(conv(x, p["conv1"]), p["bn1"]))
    y = jax.nn.relu(batch_norm(conv(y, p["conv2"], stride), p["bn2"]))
    y = batch_norm(conv(y, p["conv3"]), p["bn3"])
    shortcut = batch_norm(conv(x, p["proj"], stride), p["bn_proj"]) if "proj" in p else x
    return jax.nn.relu(y + shortcut)


def _bn_params(channels):
    return {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)}


def _kernel(key, shape):  # He et al. 2015's Gaussian, fan in
    return jax.random.normal(key, shape) * (2 / (shape[0] * shape[1] * shape[2])) ** 0.5


def _bottleneck_params(key, in_channels, width, projection):
    keys = jax.random.split(key, 4)
    p = {"conv1": _kernel(keys[0], (1, 1, in_channels, width)), "bn1": _bn_params(width),
         "conv2": _kernel(keys[1], (3, 3, width, width)), "bn2": _bn_params(width),
         "conv3": _kernel(keys[2], (1, 1, width, 4 * width)), "bn3": _bn_params(4 * width)}
    if projection:
        p["proj"], p["bn_proj"] = _kernel(keys[3], (1, 1, in_channels, 4 * width)), _bn_params(4 * width)
    return p


def init(key, stages, num_classes, scan_blocks):
    keys = jax.random.split(key, 2 + 2 * len(stages))
    params = {"stem": _kernel(keys[0], (7, 7, 3, 64)), "bn_stem": _bn_params(64), "stages": []}
    channels = 64
    for i, blocks in enumerate(stages):
        width = 64 * 2 ** i
        first = _bottleneck_params(keys[2 + 2 * i], channels, width, True)
        rest = [_bottleneck_params(k, 4 * width, width, False)
                for k in jax.random.split(keys[3 + 2 * i], blocks - 1)]
        if scan_blocks and rest:
            rest = jax.tree.map(lambda *leaves: jnp.stack(leaves), *rest)
        params["stages"].append({"first": first, "rest": rest})
        channels = 4 * width
    params["fc"] = {"kernel": jax.random.normal(keys[1], (channels, num_classes)) * 0.01,
                    "bias": jnp.zeros(num_classes)}
    return params


def forward(params, x, scan_blocks):
    x = jax.nn.relu(batch_norm(conv(x, params["stem"], 2), params["bn_stem"]))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                              [(0, 0), (1, 1), (1, 1), (0, 0)])
    for i, stage in enumerate(params["stages"]):
        x = bottleneck(x, stage["first"], 1 if i == 0 else 2)
        if scan_blocks and stage["rest"]:
            x, _ = jax.lax.scan(lambda h, p: (bottleneck(h, p), None), x, stage["rest"])
        else:
            for p in stage["rest"]:
                x = bottleneck(x, p)
    return x.mean((1, 2)) @ params["fc"]["kernel"] + params["fc"]["bias"]


def make_train_step(scan_blocks, learning_rate=0.1, momentum=0.9, weight_decay=1e-4):
    def loss_fn(params, images, labels):
        log_probs = jax.nn.log_softmax(forward(params, images, scan_blocks))
        return -jnp.take_along_axis(log_probs, labels[:, None], 1).mean()

    def train_step(params, velocity, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        velocity = jax.tree.map(lambda v, g, p: momentum * v + g + weight_decay * p,
                                velocity, grads, params)
        params = jax.tree.map(lambda p, v: p - learning_rate * v, params, velocity)
        return params, velocity, loss

    return jax.jit(train_step, donate_argnums=(0, 1))


def _stages(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(n) for n in text.split(","))
    except ValueError:
        stages = ()
    if not stages or min(stages) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas; got {text!r}")
    return stages


def parse_args(argv):
    parser = cli.OneLineParser(prog="python -m benchmarks.reference_step",
                               description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--stages", type=_stages, default=(3, 8, 36, 3),
                        help="bottleneck blocks per stage (3,8,36,3: ResNet-152)")
    parser.add_argument("--scan-blocks", action="store_true")
    parser.add_argument("--cpu-fusion", action="store_true", help="set resnet_jax.cpu's fusion flag")
    parser.add_argument("--steps", type=int, default=0, help="timed steps after a warm-up; 0 compiles only")
    parser.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for field in ("batch_size", "image_size", "steps"):
        if getattr(args, field) < (0 if field == "steps" else 1):
            parser.error(f"--{field.replace('_', '-')} must be a positive integer; got {getattr(args, field)}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.cpu_fusion:  # before JAX starts its backend, which reads XLA_FLAGS once
        cpu.set_cpu_fusion()
    if args.cache_dir:
        compile_timer.use_persistent_cache(args.cache_dir)
    params = init(jax.random.key(0), args.stages, 1000, args.scan_blocks)
    velocity = jax.tree.map(jnp.zeros_like, params)
    images = jnp.zeros((args.batch_size, args.image_size, args.image_size, 3))
    labels = jnp.zeros((args.batch_size,), jnp.int32)
    compiled, times = compile_timer.timed_compile(make_train_step(args.scan_blocks),
                                                  params, velocity, images, labels)
    result = {"stages": list(args.stages), "batch_size": args.batch_size, "image_size": args.image_size,
              "scan_blocks": args.scan_blocks, "cpu_fusion": args.cpu_fusion, "cache_dir": args.cache_dir,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "platform": jax.devices()[0].platform, **times,
              "while_loops": compiled.as_text().count(" while(")}
    if args.steps:
        state = [params, velocity]

        def step():
            *state[:], loss = compiled(*state, images, labels)
            return loss

        result["step_seconds"] = statistics.median(compile_timer.time_steps(step, args.steps))
    if args.json:
        print(json.dumps(result))
    else:
        print(", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
