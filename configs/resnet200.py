"""ResNet-200 on ImageNet with the paper's recipe (Table 1, Sec. 3.4) (He et al. 2016, Identity Mappings, Sec. 4; not in Table 1)."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet200"
    return config
