"""ResNet-50 on ImageNet with the paper's recipe (Table 1, Sec. 3.4)."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet50"
    return config
