"""VGG-16 and VGG-19 on ImageNet (Simonyan and Zisserman 2015; the baselines of He et al.,
Sec. 3.3 and Table 3), parametrised:

    --config=configs/vgg.py:depth=16,bn=False

Their recipe (Sec. 3.1): SGD with momentum 0.9, batch 256, weight decay 5e-4, dropout 0.5 on the
first two fully connected layers (in the model), lr 0.01 divided by 10 three times when the
validation accuracy stopped improving, 74 epochs; 224x224 crops of images whose shorter side is
a random length in [256, 512], flips and RGB colour shift. The plateaus are not given: the
boundaries at 30, 50 and 65 epochs are this config's choice. BN variants (bn=True) are later
practice (torchvision's vgg16_bn), trained with the same recipe here.

The model section holds only what a VGG takes: the ResNet fields of configs/default.py (shortcut,
block_order, ...) are removed, so that setting one is an error rather than silently ignored.
"""

from configs import arguments, default

FILE = "configs/vgg.py"

ARGUMENTS = {"depth": ("16", "16 or 19"),
             "bn": ("False", "True: BN after each convolution (torchvision's vgg16_bn)")}
RESNET_ONLY = ("block", "shortcut", "stride_on", "block_order", "gate", "gate_bias",
               "zero_init_residual", "scan_blocks", "remat", "drop_path_rate")


def get_config(arg: str | None = None):
    args = arguments.parse(arg, ARGUMENTS, FILE)

    config = default.get_config()
    for field in RESNET_ONLY:
        del config.model[field]
    depth, bn = arguments.integer(args, "depth", FILE), arguments.boolean(args, "bn", FILE)
    config.model.name = f"vgg{depth}{'_bn' if bn else ''}"
    config.data.scale_range = (256, 512)     # scale jittering, S in [256, 512] (Sec. 3.1)
    config.train.num_epochs = 74.0
    config.optimizer.weight_decay = 5e-4
    config.schedule.update(dict(name="step", base_lr=0.01, scale_by_batch=True,
                                boundaries_epochs=(30, 50, 65)))
    return config
