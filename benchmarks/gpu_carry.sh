#!/usr/bin/env bash
# What benchmarks/gpu_check.py needs on the GPU machine beyond what it has there: the wheels of
# ml-collections and clu (pure Python; the machine has their other needs: absl, etils, PyYAML,
# wrapt, flax, jax) and the CIFAR-10 JPEG archive given as the argument (train/CLASS/*.jpg and
# test/CLASS/*.jpg inside). Into build/gpu_check/, which git ignores and the device tool carries.
#
#   bash benchmarks/gpu_carry.sh CIFAR_ARCHIVE.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
archive=${1:?usage: bash benchmarks/gpu_carry.sh CIFAR_ARCHIVE.tar.gz}
out=build/gpu_check
rm -rf "$out" && mkdir -p "$out/wheels"
# The versions requirements.txt pins; --no-deps: only these two travel.
pins=$(grep -E '^(ml-collections|clu)==' requirements.txt)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$out/wheels" $pins
cp "$archive" "$out/cifar.tar.gz"
du -sh "$out"
