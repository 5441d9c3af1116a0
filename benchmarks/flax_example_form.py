"""A ResNet train step in the form of the Flax ImageNet example, to time it beside ours on the
machine at hand (issue 5's targets are ratios to that example's compile time and images/s).

    python -m benchmarks.flax_example_form --model resnet152 --batch-size 8 --steps 0
    python -m benchmarks.flax_example_form --model resnet50 --batch-size 16 --steps 3

Written here, not copied: Flax linen modules (bottleneck blocks, `nn.BatchNorm` with momentum
0.9 and epsilon 1e-5, the last BN of each block initialised to zero, a projection where the
shape changes), the step `jax.pmap`ped over the local devices with gradients and metrics
`pmean`ed, L2 weight decay 1e-4 added to the loss, optax SGD with Nesterov momentum 0.9 and a
warm-up + cosine schedule; no XLA flags. Timed as benchmarks/train_step.py times ours.
"""

import argparse
import functools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

STAGES = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}


class Bottleneck(nn.Module):
    filters: int
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x, train):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
        y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(y)))
        y = norm(scale_init=nn.initializers.zeros)(conv(self.filters * 4, (1, 1))(y))
        if x.shape != y.shape:
            x = norm()(conv(self.filters * 4, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    stages: tuple

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                x = Bottleneck(64 * 2 ** i, (2, 2) if i > 0 and j == 0 else (1, 1))(x, train)
        return nn.Dense(1000)(x.mean((1, 2)))


class State(train_state.TrainState):
    batch_stats: dict


def train_step(state, batch, schedule):
    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         batch["image"], mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], 1000)).mean()
        l2 = sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params) if p.ndim > 1)
        return loss + 1e-4 * 0.5 * l2, (updates, logits)

    (loss, (updates, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, "batch")
    metrics = jax.lax.pmean({"loss": loss, "learning_rate": schedule(state.step),
                             "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}, "batch")
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), metrics


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flax_example_form")
    parser.add_argument("--model", default="resnet152", choices=sorted(STAGES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=0, help="timed steps after one warm-up; 0 compiles only")
    args = parser.parse_args(argv)
    model = ResNet(STAGES[args.model])
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    variables = jax.jit(lambda key: model.init(key, jnp.ones((1,) + shape[1:]), train=False))(jax.random.key(0))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, 0.1, 5000),
                                     optax.cosine_decay_schedule(0.1, 95000)], [5000])
    state = State.create(apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
                         tx=optax.sgd(schedule, momentum=0.9, nesterov=True))
    devices = jax.local_device_count()
    state = jax.tree.map(lambda leaf: jnp.stack([jnp.asarray(leaf)] * devices), state)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((devices,) + shape).astype(np.float32),
             "label": rng.integers(0, 1000, (devices, args.batch_size)).astype(np.int32)}
    step = jax.pmap(functools.partial(train_step, schedule=schedule), axis_name="batch")
    began = time.perf_counter()
    lowered = step.lower(state, batch)  # pmap traces while lowering
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    result = {"model": args.model, "batch_size": args.batch_size, "devices": devices,
              "trace_and_lower_seconds": lowered_at - began,
              "backend_compile_seconds": done - lowered_at, "compile_seconds": done - began}
    times = []
    for _ in range(args.steps + 1 if args.steps else 0):
        began = time.perf_counter()
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - began)
    if times:
        result["step_seconds"] = statistics.median(times[1:])
        result["images_per_second"] = devices * args.batch_size / result["step_seconds"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
