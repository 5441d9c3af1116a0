#!/usr/bin/env bash
# What benchmarks/gpu_check.py needs on the GPU machine beyond its image: the wheels of the
# distributions gpu_check.CARRIED names, at requirements.txt's pins (pure Python: the image lacks
# ml-collections and clu, and has flax, optax and orbax-checkpoint at versions this project was
# not tested with; it has their other needs), and the CIFAR-10 JPEG archive if one is given
# (train/CLASS/*.jpg and test/CLASS/*.jpg inside). Into build/gpu_check/, which git ignores: name
# it in the device tool's `carry`. Refused in one line when the working tree and build/gpu_check
# together pass the 64 MiB that travel.
#
#   bash benchmarks/gpu_carry.sh [CIFAR_ARCHIVE.tar.gz]
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/gpu_check
rm -rf "$out" && mkdir -p "$out/wheels"
pins=$(python -c 'from benchmarks import gpu_check as g; print(*g.carried_requirements((3, 12)))')
# --no-deps: only these travel. Pure-Python wheels; the image's Python is 3.12.
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$out/wheels" $pins
if [ $# -ge 1 ]; then cp "$1" "$out/cifar.tar.gz"; fi
# What travels: the files git tracks or does not ignore, and build/gpu_check.
git ls-files -z --cached --others --exclude-standard | python -c '
import os, sys
tree = sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if os.path.isfile(p))
out = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sys.argv[1]) for f in fs)
mib = lambda n: f"{n / 2**20:.1f} MiB"
if tree + out > 64 * 2**20:
    sys.exit(f"error: {sys.argv[1]} ({mib(out)}) and the working tree ({mib(tree)}) pass the "
             "64 MiB that travel to the GPU machine: carry a smaller CIFAR archive")
wheels = len(os.listdir(os.path.join(sys.argv[1], "wheels")))
print(f"{sys.argv[1]}: {mib(out)} ({wheels} wheels); with the working tree, {mib(tree + out)} "
      "of the 64 MiB that travel")
' "$out"
