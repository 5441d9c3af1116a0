"""torchvision's ResNet train step: the peer a GPU user would pick instead, timed as
benchmarks/train_step.py times this project's step.

    python -m benchmarks.torch_step --model resnet50 --batch-size 256 --image-size 224 [--steps N]

torchvision's network (its ResNet-50 strides on the 3x3 convolution: `--stride-on 3x3` of
benchmarks/train_step.py is the same network), SGD with lr 0.1, momentum 0.9 and weight decay
1e-4, cross-entropy, on random images; under `torch.autocast` in bfloat16 with channels_last
memory format and cudnn.benchmark, torch's fast path for convolutional networks on GPUs.
step_seconds is the median of `--steps` steps after `--warmup` untimed ones, each waited for.
One JSON object on stdout. On a machine without CUDA it runs on the CPU (for the tests).
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torchvision

from benchmarks import cli


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.OneLineParser(prog="python -m benchmarks.torch_step",
                               description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="a name of torchvision.models")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cudnn's search)")
    args = parser.parse_args(argv)
    for field in ("batch_size", "image_size", "steps", "warmup"):
        if getattr(args, field) < (0 if field == "warmup" else 1):
            parser.error(f"--{field.replace('_', '-')} must be a positive integer; got {getattr(args, field)}")
    return args


def run(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.model)().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(net(images), labels)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return loss

    began = time.perf_counter()
    step()
    first = time.perf_counter() - began
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    return {"framework": "torch", "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "model": f"torchvision.models.{args.model}", "batch_size": args.batch_size,
            "image_size": args.image_size, "autocast_dtype": "bfloat16", "channels_last": True,
            "first_step_seconds": first, "step_seconds": seconds,
            "step_seconds_min": min(times), "step_seconds_max": max(times),
            "images_per_second": args.batch_size / seconds,
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "loss": float(loss.item())}


def main(argv: list[str] | None = None) -> dict:
    result = run(parse_args(sys.argv[1:] if argv is None else argv))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
