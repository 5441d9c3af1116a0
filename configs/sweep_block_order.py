"""Sweep: where BN and ReLU sit in a residual block, crossed with depth, on CIFAR-10.

    python -m launch.sweep --sweep=configs/sweep_block_order.py --workdir=BASE [--mode=tpu|slurm ...]

block_order: "post" (the paper, Fig. 2), "pre" (full pre-activation, He et al. 2016, "Identity
Mappings", Fig. 4e), "no_final_relu" and "bn_after_add" (Gross and Wilber 2016, "Training and
investigating Residual Nets"; BN after the addition was found to hurt). Each point is
configs/cifar.py at a depth (option A shortcuts, the CIFAR recipe of Sec. 4.2 with ResNet-110's
warmup) with one block order; train on all 50k images and test on the test set.
"""

from configs import cifar

DEPTHS = (20, 56, 110)
BLOCK_ORDERS = ("post", "pre", "no_final_relu", "bn_after_add")


def get_config(arg=None):
    return cifar.get_config(arg)


def get_sweep():
    return [{"config": f"configs/cifar.py:depth={depth}", "model.block_order": order}
            for depth in DEPTHS for order in BLOCK_ORDERS]
