"""CIFAR-10 networks of Sec. 4.2 (Table 6, Fig. 6), parametrised:

    --config=configs/cifar.py:depth=110,plain=False,shortcut=A,val=False,bn=global

depth is 6n+2; plain gives the plain twin; val=True trains on 45k images and evaluates on the
other 5k of the training set, as the paper's validation split, instead of the test set.

bn: what each BN normalises over in training. The paper trained with "a mini-batch size of 128
on two GPUs" (Sec. 4.2), in Caffe, whose BN normalises each GPU's 64 examples. bn=paper does
that: model.bn_group_size=64, groups of 64 whatever the device count, on any count whose
per-device batch holds whole groups (1 or 2 devices at batch 128; elsewhere the run is refused
at start in one line saying what to set). bn=global, the default, normalises over the whole
batch of 128: the paper states the batch and its GPUs but not BN's span, and the global batch
gives the same run on any device count, where bn=paper refuses 4 or 8. Use bn=paper to
reproduce Table 6 and Fig. 6 as they were run.
Depth 110 and more warm up at lr 0.01 until the training error of a log window (the
log_every_steps steps before a log line) is below 80%, as Sec. 4.2 says, then take 0.1
(schedule.warmup_until_error=0.8; --config.schedule.warmup_until_error=0
--config.schedule.warmup_steps=400 warms up for a fixed 400 steps instead).
--config.data.on_device=True holds the decoded train split on the devices and pads, crops and
flips inside the train step (resnet_jax/data/on_device.py); with
--config.data.name=imagefolder:PATH (train/CLASS/*.png, test/CLASS/*.png) it needs no TensorFlow.
"""

from configs import arguments, default

FILE = "configs/cifar.py"
# bn=...: the BN group size, None for the whole batch. The paper's: 64 on each of two GPUs.
BN_GROUPS = {"global": None, "paper": 64}
BN_ARGUMENT = ("global", '"global": BN over the whole batch; "paper": over each 64 examples, as '
                         'its two GPUs did')
VAL_ARGUMENT = ("False", "True: train on 45k images, evaluate on the other 5k (the paper's "
                         "validation split); False: the test set")
ARGUMENTS = {
    "depth": ("20", "6n+2: 20, 32, 44, 56, 110, 1202 (Table 6), or any other"),
    "plain": ("False", "True: the plain network, without shortcuts"),
    "shortcut": ("A", '"A", "B" or "C" (Sec. 3.3)'),
    "val": VAL_ARGUMENT,
    "bn": BN_ARGUMENT,
}


def get_config(arg: str | None = None):
    args = arguments.parse(arg, ARGUMENTS, FILE)
    depth = arguments.integer(args, "depth", FILE)
    plain, val = arguments.boolean(args, "plain", FILE), arguments.boolean(args, "val", FILE)
    bn = arguments.choice(args, "bn", BN_GROUPS, FILE)

    config = default.get_config()
    config.model.name = f"cifar_{'plain' if plain else 'resnet'}{depth}"
    config.model.shortcut = args["shortcut"]
    config.model.width = 16
    config.model.bn_group_size = BN_GROUPS[bn]
    config.data.update(dict(
        name="cifar10", train_split="train[:45000]" if val else "train",
        eval_split="train[45000:]" if val else "test", image_size=32,
        train_preprocess="cifar", eval_preprocess="none", pca_lighting=0.0,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), subtract_pixel_mean=True, num_classes=10,
        dtype="float32"))  # padding and the pixel mean are applied to normalised images
    config.train.batch_size = 128
    config.train.num_steps = 64_000          # "terminate training at 64k iterations"
    config.schedule.update(dict(
        name="paper_cifar", base_lr=0.1, scale_by_batch=False, boundaries_steps=(32_000, 48_000),
        # ResNet-110 (and deeper) start at 0.01 "until the training error is below 80% (about 400
        # iterations), and then go back to 0.1": the error of each log window is tested.
        warmup_lr=0.01, warmup_steps=0, warmup_until_error=0.8 if depth >= 110 else 0.0))
    config.eval.update(dict(batch_size=500, every_steps=1_000))
    config.checkpoint.every_steps = 1_000
    return config
