"""Kernel-gradient time of single convolutions: XLA's own against resnet_jax.conv's matrix products.

    python -m benchmarks.conv_grad [--repeats 5] [--json]

The layers are those that dominate the CIFAR ResNets (batch 128) and ResNet-50 (batch 16).
Each time is the median of `repeats` calls of the jitted kernel gradient alone (the output
gradient given), after one warm-up call.
"""

import argparse
import json
import statistics
import time

import jax

from resnet_jax import cpu

# (name, batch, map size, in channels, out channels, kernel, stride)
LAYERS = [
    ("CIFAR stage 1 3x3", 128, 32, 16, 16, 3, 1),
    ("CIFAR stage 3 3x3", 128, 8, 64, 64, 3, 1),
    ("ResNet-50 stem 7x7/2", 16, 224, 3, 64, 7, 2),
    ("ResNet-50 conv2 1x1 reduce", 16, 56, 256, 64, 1, 1),
    ("ResNet-50 conv2 3x3", 16, 56, 64, 64, 3, 1),
    ("ResNet-50 conv2 1x1 restore", 16, 56, 64, 256, 1, 1),
    ("ResNet-50 conv4 3x3", 16, 14, 256, 256, 3, 1),
]


def _median_seconds(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(batch, size, cin, cout, kernel, stride, repeats):
    pad = (kernel - 1) // 2
    padding = ((pad, pad), (pad, pad))
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, size, size, cin))
    w = jax.random.normal(kw, (kernel, kernel, cin, cout))
    out = -(-size // stride)
    g = jax.random.normal(kg, (batch, out, out, cout))

    def xla_gradient(x, w, g):
        return jax.vjp(lambda w: jax.lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")), w)[1](g)[0]

    ours = jax.jit(lambda x, g: cpu.kernel_gradient(x, g, w.shape, (stride, stride), padding))
    return (_median_seconds(jax.jit(xla_gradient), x, w, g, repeats=repeats),
            _median_seconds(ours, x, g, repeats=repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per layer")
    args = parser.parse_args()
    if not args.json:
        print(f"{'layer':30s} {'shape':>26s} {'xla s':>8s} {'matmul s':>9s} {'speed-up':>8s}")
    for name, *shape in LAYERS:
        xla, ours = measure(*shape, repeats=args.repeats)
        batch, size, cin, cout, kernel, stride = shape
        if args.json:
            print(json.dumps(dict(layer=name, batch=batch, size=size, in_channels=cin,
                                  out_channels=cout, kernel=kernel, stride=stride,
                                  xla_seconds=xla, matmul_seconds=ours)))
        else:
            described = f"{batch}x{size}x{size}x{cin}->{cout} {kernel}x{kernel}/{stride}"
            print(f"{name:30s} {described:>26s} {xla:8.4f} {ours:9.4f} {xla / ours:7.1f}x")


if __name__ == "__main__":
    main()
