"""Writes an image folder of ImageNet-like JPEGs for `benchmarks/input_pipeline.py`.

    python -m benchmarks.make_images /tmp/imagenet_like [--count 500] [--classes 10]

Sizes as ImageNet's: 70% 500x375, 15% 375x500, the rest random in 300-640 x 240-480. The pixels
are smooth random shapes with texture and noise, so that a file costs what a photo of its size
costs to decode: quality 90, about 100 KB a file (ImageNet's mean is about 110 KB). The files go
to `ROOT/train/nXXXXXXXX/NNNNN.JPEG`, the image folder layout `data.name=imagefolder:ROOT` reads.
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageFilter


def _size(rng) -> tuple[int, int]:
    """(width, height)."""
    u = rng.uniform()
    if u < 0.7:
        return 500, 375
    if u < 0.85:
        return 375, 500
    return int(rng.integers(300, 641)), int(rng.integers(240, 481))


def image(rng) -> Image.Image:
    width, height = _size(rng)
    # Large shapes: a 6x8 grid of random colours, smoothly interpolated.
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
                      .resize((width, height), Image.BICUBIC), np.float32)
    # Texture: a random layer at 1/8 scale.
    texture = np.asarray(Image.fromarray(
        rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8))
        .resize((width, height), Image.BICUBIC), np.float32)
    pixels = base + 0.4 * (texture - 128) + rng.normal(0, 23, (height, width, 3))
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(0.4))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 1 or args.classes < 1:
        parser.error("--count and --classes must be positive")
    rng = np.random.default_rng(args.seed)
    for i in range(args.count):
        folder = os.path.join(args.root, "train", f"n{i % args.classes:08d}")
        os.makedirs(folder, exist_ok=True)
        image(rng).save(os.path.join(folder, f"{i:05d}.JPEG"), quality=90)
    print(f"{args.count} images in {args.root}/train")


if __name__ == "__main__":
    main()
