"""Sweep: Table 6, CIFAR-10 ResNets of 20 to 1202 layers with option A shortcuts (Sec. 4.2).

    python -m launch.sweep --sweep=configs/sweep_table6.py --workdir=BASE [--mode=tpu|slurm ...]

Each point is configs/cifar.py at a depth, so that the depth also sets the warmup of ResNet-110
and -1202 (lr 0.01 for the first 400 iterations); the runs train on all 50k training images and
test on the test set, as the table reports.
"""

from configs import cifar

DEPTHS = (20, 32, 44, 56, 110, 1202)


def get_config(arg=None):
    return cifar.get_config(arg)


def get_sweep():
    return [{"config": f"configs/cifar.py:depth={depth}"} for depth in DEPTHS]
