"""The 18-layer plain network of Table 2 and Fig. 4: ResNet-18's stack without shortcuts."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "plain18"
    return config
