"""The pre-activation ResNet-200 on ImageNet of He, Zhang, Ren and Sun 2016, "Identity Mappings in
Deep Residual Networks" (arXiv:1603.05027), Sec. 5 and its ImageNet table.

From that paper: full pre-activation units, BN-ReLU-conv inside each branch and nothing after
the addition (Fig. 4e), bottleneck blocks; with its appendix's two special cases, the BN-ReLU
after conv1 kept before the first unit splits into its two paths, and one extra BN-ReLU after
the last unit's addition, before the average pooling (`models.ResNet`, block_order="pre").
Not from it: the stage sizes (3, 24, 36, 3) are those of the authors' Torch code
(fb.resnet.torch's preresnet), and the training recipe is that of [1] (Sec. 3.4,
configs/default.py: SGD, momentum 0.9, weight decay 1e-4 on every parameter, batch 256, lr 0.1
divided by 10 at epochs 30, 60, 90 of 120, scale augmentation, centre-crop eval), not checked
against the 2016 paper's own statement of its schedule and test crops.
`--config.model.block_order=post` gives the original units of [1] at the same depth, the
baseline of that comparison. BN over each 32 examples, [1]'s per-GPU BN, as the other ImageNet
configs; `--config=configs/resnet200.py:bn=global`: over the whole batch.
"""

from configs import default

ARGUMENTS = default.IMAGENET_ARGUMENTS
FILE = "configs/resnet200.py"


def get_config(arg: str | None = None):
    config = default.get_config()
    config.model.update(dict(name="resnet200", block_order="pre"))
    config.model.bn_group_size = default.imagenet_bn_group_size(arg, FILE)
    return config
