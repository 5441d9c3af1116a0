"""Sweep: Table 2 and Fig. 4, plain and residual networks of 18 and 34 layers on ImageNet (Sec. 4.1).

    python -m launch.sweep --sweep=configs/sweep_table2.py --workdir=BASE [--mode=tpu|slurm ...]

The residual nets of this comparison have identity shortcuts with zero-padding where the
dimensions grow (option A), so they have no parameter more than their plain twins; plain nets have
no shortcuts and ignore the option.
"""

from configs import resnet18


def get_config(arg=None):
    config = resnet18.get_config()
    config.model.shortcut = "A"
    return config


def get_sweep():
    return [{"model.name": name} for name in ("plain18", "plain34", "resnet18", "resnet34")]
