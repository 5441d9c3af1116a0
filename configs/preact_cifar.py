"""Pre-activation ResNets on CIFAR-10 (He, Zhang, Ren and Sun 2016, "Identity Mappings in Deep
Residual Networks", Sec. 4 and 5):

    --config=configs/preact_cifar.py:depth=164,val=False,bn=global

depth  block       blocks per stage  parameters (paper)  test error (paper, pre-activation)
110    basic       18 (6n+2)         1.7M                6.37%
164    bottleneck  18 (9n+2)         1.7M                5.46%
1001   bottleneck  111               10.2M               4.92%

Bottleneck stages have 16, 32 and 64 filters, 4x that out (`models.create` with
block="bottleneck"). Training as the paper's appendix: batch 128 (64 on each of 2 GPUs), lr 0.1
divided by 10 at 32k and 48k iterations, weight decay 1e-4, momentum 0.9, He initialisation, and
lr 0.01 for the first 400 iterations ("not necessary" for pre-activation, the paper remarks,
but kept as in [1]); the augmentation of [1] (configs/cifar.py); 64k iterations, as [1].
bn=paper normalises per 64 examples as its 2 GPUs did; bn=global, the default, over the batch
(configs/cifar.py says why).
`--config.model.block_order=post` gives the "original" units of the same tables.

Shortcuts: ResNet-110 keeps option A (zero-padding, no parameters), so that it differs from the
original ResNet-110 of [1] by its block order alone; the bottleneck networks project where the
shape changes (option B, a 1x1 convolution without BN), as the authors' released code for
ResNet-164 and -1001 does. The parameter counts above are the paper's rounding; with BN's scale
and bias, ResNet-1001 has 10.33M (10.18M without them), checked in tests/networks/test_variants.py.
"""

from configs import arguments, cifar

FILE = "configs/preact_cifar.py"

# depth: (block kind, shortcut option)
NETWORKS = {110: ("basic", "A"), 164: ("bottleneck", "B"), 1001: ("bottleneck", "B")}
ARGUMENTS = {"depth": ("164", "110, 164 or 1001"), "val": cifar.VAL_ARGUMENT, "bn": cifar.BN_ARGUMENT}


def get_config(arg: str | None = None):
    args = arguments.parse(arg, ARGUMENTS, FILE)
    depth = arguments.integer(args, "depth", FILE)
    arguments.boolean(args, "val", FILE)  # checked here, so that an error names this file
    arguments.choice(args, "bn", cifar.BN_GROUPS, FILE)
    if depth not in NETWORKS:
        raise ValueError(f"configs/preact_cifar.py: depth must be one of "
                         f"{', '.join(map(str, NETWORKS))}; got {depth}")
    block, shortcut = NETWORKS[depth]

    # The CIFAR recipe; the model is set below.
    config = cifar.get_config(f"depth=20,val={args['val']},bn={args['bn']}")
    config.model.update(dict(name=f"cifar_resnet{depth}", block=block, shortcut=shortcut,
                             block_order="pre"))
    # He et al. 2016 warm up every CIFAR network for 400 iterations at lr 0.01.
    config.schedule.update(dict(warmup_lr=0.01, warmup_steps=400))
    return config
