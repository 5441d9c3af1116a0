"""The 18-layer plain network of Table 2 and Fig. 4: ResNet-18's stack without shortcuts.

    --config=configs/plain18.py[:bn=global]

BN over each 32 examples, the paper's per-GPU BN; bn=global: over the whole batch
(configs/default.py, IMAGENET_BN_GROUPS).
"""

from configs import default

ARGUMENTS = default.IMAGENET_ARGUMENTS
FILE = "configs/plain18.py"


def get_config(arg: str | None = None):
    config = default.get_config()
    config.model.name = "plain18"
    config.model.bn_group_size = default.imagenet_bn_group_size(arg, FILE)
    return config
