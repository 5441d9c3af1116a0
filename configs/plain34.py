"""The 34-layer plain network of Table 2 and Fig. 4: ResNet-34's stack without shortcuts."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "plain34"
    return config
