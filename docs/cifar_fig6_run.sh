#!/usr/bin/env bash
# The CPU reproduction of Fig. 6 (docs/cifar_fig6.md): plain-20, plain-56, ResNet-20 and ResNet-56
# trained side by side on the CIFAR-10 JPEGs, with the paper's recipe (Sec. 4.2) on a schedule
# shortened to STEPS iterations (the learning rate divided by 10 at 50% and 75% of it, as the
# paper's 32k and 48k of 64k). Evaluation every 50 steps on 2,000 test images (the folder's
# fixed shuffled order). Running it again resumes every run from its last checkpoint; it exits
# non-zero if any run failed (see OUT/NAME.log).
#
#   mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10_jpeg.tar.gz -C /tmp/cifar10
#   bash docs/cifar_fig6_run.sh /tmp/cifar10 /tmp/cifar_fig6 300
set -euo pipefail
data=${1:?image folder with train/ and test/} out=${2:?output directory} steps=${3:-300}
mkdir -p "$out"
pids=()
for net in plain=True,depth=20 plain=True,depth=56 plain=False,depth=20 plain=False,depth=56; do
  name=$( [[ $net == plain=True* ]] && echo plain || echo resnet )${net##*=}
  python -m resnet_jax.main --config="configs/cifar.py:$net" --workdir="$out/$name" \
    --config.data.name="imagefolder:$data" \
    --config.train.num_steps="$steps" \
    --config.schedule.boundaries_steps="($((steps / 2)), $((steps * 3 / 4)))" \
    --config.data.eval_split="test[:2000]" \
    --config.eval.every_steps=50 --config.checkpoint.every_steps=50 \
    --config.log_every_steps=10 "${@:4}" >>"$out/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
