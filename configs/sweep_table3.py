"""Sweep: Table 3, ResNet-34 on ImageNet with shortcut options A, B and C (Sec. 3.3, 4.1).

    python -m launch.sweep --sweep=configs/sweep_table3.py --workdir=BASE [--mode=tpu|slurm ...]

A: zero-padding identity, no parameters; B: projections where the dimensions grow; C: projections
on every block.
"""

from configs import resnet34


def get_config(arg=None):
    return resnet34.get_config()


def get_sweep():
    return [{"model.shortcut": option} for option in ("A", "B", "C")]
