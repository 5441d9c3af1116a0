"""Input-pipeline throughput: images per second of one process's tf.data pipeline.

    python -m benchmarks.input_pipeline --data imagefolder:PATH --split train \
        --preprocess inception --batch-size 64 [--json]

`--preprocess` names a train preprocessing (inception, paper, cifar, none: the seeded, shuffled
train pipeline) or an eval one (center, ten_crop: the eval pipeline, repeated). The pipeline runs
`--warmup` batches, then is timed over `--batches` batches (or `--seconds`, whichever ends first);
numpy batches are fetched as the training loop fetches them. Images per second count source
images (a ten_crop image is one image).

Restart cost: `--start-fraction F` starts the train pipeline at the step F of the way into an
epoch (as a run resumed there does) and reports `first_batch_seconds`, from building the pipeline
to its first batch. For a TFDS split, `--in-memory-bytes 0` streams it whatever its size and
`--shuffle-buffer` sets the stream's buffer:

    python -m benchmarks.input_pipeline --data NAME --data-dir DIR --in-memory-bytes 0 \
        --shuffle-buffer 1024 --start-fraction 0.9 --warmup 0 --batches 0
"""

import argparse
import json
import os
import platform
import resource
import time

import ml_collections

from resnet_jax.data import pipeline, preprocess

EVAL = ("center", "ten_crop")


def _config(args) -> ml_collections.ConfigDict:
    train = args.preprocess not in EVAL
    return ml_collections.ConfigDict({
        "name": args.data,
        "data_dir": args.data_dir,
        "train_split": args.split,
        "eval_split": args.split,
        "image_size": args.image_size,
        "train_preprocess": args.preprocess if train else "none",
        "eval_preprocess": "none" if train else args.preprocess,
        "pca_lighting": args.pca_lighting,
        "dtype": args.dtype,
        "resize_method": args.resize_method,
        "antialias": args.antialias,
        "in_memory_bytes": args.in_memory_bytes,
        "shuffle_buffer": args.shuffle_buffer,
    })


def _start_step(config, args) -> int:
    """The step `--start-fraction` of the way into an epoch of one process."""
    if args.start_fraction is None:
        return 0
    if args.preprocess in EVAL or not 0 <= args.start_fraction < 1:
        raise ValueError(f"--start-fraction={args.start_fraction} needs a train --preprocess and "
                         f"a fraction in [0, 1)")
    return int(args.start_fraction * pipeline.info(config).num_train) // args.batch_size


def run(args) -> dict:
    config = _config(args)
    start_step = _start_step(config, args)
    start = time.perf_counter()
    if args.preprocess in EVAL:
        ds = pipeline.eval_dataset(config, batch_size=args.batch_size, repeat=True)
    else:
        ds = pipeline.train_dataset(config, batch_size=args.batch_size, seed=0, start_step=start_step)
    build_s = time.perf_counter() - start
    it = ds.as_numpy_iterator()
    next(it)  # the first of the warm-up batches
    first_batch_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        next(it)
    warmup_s = time.perf_counter() - start - build_s
    images, start, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        images += len(next(it)["label"])
        if time.perf_counter() - start > args.seconds:
            break
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "data": args.data, "split": args.split, "preprocess": args.preprocess,
        "pipeline": "resnet_jax",
        "batch_size": args.batch_size, "image_size": args.image_size, "dtype": args.dtype,
        "start_step": start_step,
        # Building the pipeline and its first batch: a restart's cost before its first step.
        "first_batch_seconds": round(first_batch_s, 3), "build_seconds": round(build_s, 3),
        "images": images, "seconds": round(elapsed, 3), "warmup_seconds": round(warmup_s, 3),
        "images_per_second": round(images / elapsed, 1) if images else None,
        "images_per_second_per_core": round(images / elapsed / cores, 1) if images else None,
        # CPU seconds of this process (all threads): robust when other work shares the cores.
        "images_per_cpu_second": round(images / cpu, 1) if images else None,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cores": cores, "machine": platform.processor() or platform.machine(),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True,
                        help="data.name: a TFDS name, imagefolder:PATH, digits or fake")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir")
    parser.add_argument("--split", default="train")
    parser.add_argument("--preprocess", default="inception",
                        choices=preprocess.TRAIN_PREPROCESS + EVAL)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="uint8", choices=tuple(preprocess.DTYPES),
                        help="uint8 (the default config's): pixels, normalised on the devices")
    parser.add_argument("--pca-lighting", type=float, default=0.0)
    parser.add_argument("--resize-method", default="bilinear", choices=preprocess.RESIZE_METHODS)
    parser.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--in-memory-bytes", type=int, default=None,
                        help="data.in_memory_bytes: TFDS train slices up to this are held in "
                             "memory (0: stream any)")
    parser.add_argument("--shuffle-buffer", type=int, default=None,
                        help="data.shuffle_buffer of a streamed TFDS split")
    parser.add_argument("--start-fraction", type=float, default=None,
                        help="start the train pipeline this far into an epoch (0.9: at 90%%); "
                             "first_batch_seconds is the restart's cost")
    parser.add_argument("--warmup", type=int, default=20,
                        help="batches before timing (the first is always fetched)")
    parser.add_argument("--batches", type=int, default=100, help="batches timed (at most)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit of the timing")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    if args.start_fraction is not None:
        print(f"{result['pipeline']} on {result['data']}:{result['split']} from step "
              f"{result['start_step']} ({args.start_fraction:.0%} into an epoch): first batch "
              f"after {result['first_batch_seconds']:.2f} s")
    if result["images"]:
        print(f"{result['pipeline']} {result['preprocess']} on {result['data']}:"
              f"{result['split']}, batch "
              f"{result['batch_size']}: {result['images_per_second']:.1f} images/s "
              f"({result['images_per_second_per_core']:.1f} per core, {result['cores']} cores; "
              f"{result['images_per_cpu_second']:.1f} per CPU second; "
              f"{result['images']} images in {result['seconds']:.1f} s after "
              f"{args.warmup} warm-up batches)")


if __name__ == "__main__":
    main()
