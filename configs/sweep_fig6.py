"""Sweep: Fig. 6, CIFAR-10 plain-20/32/44/56 (left) against ResNet-20/32/44/56/110 (middle), Sec. 4.2.

    python -m launch.sweep --sweep=configs/sweep_fig6.py --workdir=BASE [--mode=tpu|slurm ...]

Each point is configs/cifar.py with its arguments (the depth also sets ResNet-110's warmup); the
curves of training and test error come from each run's metrics.jsonl.
"""

from configs import cifar

PLAIN_DEPTHS = (20, 32, 44, 56)
RESNET_DEPTHS = (20, 32, 44, 56, 110)


def get_config(arg=None):
    return cifar.get_config(arg)


def get_sweep():
    return ([{"config": f"configs/cifar.py:depth={depth},plain=True"} for depth in PLAIN_DEPTHS]
            + [{"config": f"configs/cifar.py:depth={depth},plain=False"} for depth in RESNET_DEPTHS])
