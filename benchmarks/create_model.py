"""How long creating a network takes the first time in a process, after the imports: what a
user meets when importing the modules (`models.create`, or the Linen bridge's `init`).

    python -m benchmarks.create_model --model resnet50 [--block bottleneck] [--linen] [--json]

Each run is one process, so that nothing is compiled or cached before the timed call; the
XLA compilations it made are counted too.
"""

import json
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.cli import OneLineParser
from resnet_jax import linen, models


def main():
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--block", help="a CIFAR network's block: basic or bottleneck")
    parser.add_argument("--linen", action="store_true",
                        help="the Linen bridge's init on one 32x32 image instead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    options = {} if args.block is None else {"block": args.block}
    num_classes = 10 if args.model.startswith("cifar") else 1000
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiles.append(seconds)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    began = time.perf_counter()
    if args.linen:
        network = linen.create(args.model, num_classes=num_classes, **options)
        made = network.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    else:
        made = nnx.state(models.create(args.model, num_classes=num_classes, rngs=nnx.Rngs(0),
                                       **options))
    jax.block_until_ready(made)
    result = {"model": args.model, **options, "linen": args.linen,
              "seconds": round(time.perf_counter() - began, 2), "compiles": len(compiles),
              "compile_seconds": round(sum(compiles), 2)}
    print(json.dumps(result) if args.json else result)


if __name__ == "__main__":
    main()
