"""ResNet-18 on ImageNet with the paper's recipe (Table 1, Sec. 3.4):

    --config=configs/resnet18.py[:bn=global]

BN over each 32 examples, the paper's per-GPU BN; bn=global: over the whole batch
(configs/default.py, IMAGENET_BN_GROUPS).
"""

from configs import default

ARGUMENTS = default.IMAGENET_ARGUMENTS
FILE = "configs/resnet18.py"


def get_config(arg: str | None = None):
    config = default.get_config()
    config.model.name = "resnet18"
    config.model.bn_group_size = default.imagenet_bn_group_size(arg, FILE)
    return config
