"""Fine-tuning torchvision's ImageNet ResNets on small images in an image folder (CIFAR-10's
32x32, say): a modern recipe beside the paper's, not one of its experiments.

    --config=fine_tune_small:depth=18 --config.model.init_from=resnet18.pth \
        --config.data.name=imagefolder:DIR --config.data.num_classes=10

DIR holds train/CLASS/*.jpg and test/CLASS/*.jpg (the layout TFDS's ImageFolder reads).
The network is torchvision's (stride on the 3x3 convolution, option B, width 64), so that its
weights load; a new classifier replaces theirs where the class count differs. The images keep
their size (32x32: the ImageNet stem and stages leave 1x1 maps, a known cost of small inputs)
and are augmented as the paper's CIFAR recipe (Sec. 4.2: 4-pixel padding, random crop, flip),
which pads normalised images, so they travel as float32; torchvision's ImageNet mean and std,
as its weights were trained. SGD with momentum 0.9 and weight decay 1e-4, a cosine schedule from
0.01 with a one-epoch warm-up, batch 128, 5000 steps: a common fine-tuning choice, not tuned.
"""

from configs import arguments, default

ARGUMENTS = {"depth": ("18", "18, 34, 50, 101 or 152: torchvision's resnet{depth}")}
FILE = "configs/fine_tune_small.py"


def get_config(arg: str | None = None):
    args = arguments.parse(arg, ARGUMENTS, FILE)
    depth = arguments.integer(args, "depth", FILE)
    config = default.get_config()
    config.model.update(dict(name=f"resnet{depth}", stride_on="3x3", shortcut="B", width=64))
    config.data.update(dict(
        name="imagefolder:", train_split="train", eval_split="test", image_size=32,
        train_preprocess="cifar", eval_preprocess="none", pca_lighting=0.0, dtype="float32",
        num_classes=10))
    config.train.update(dict(batch_size=128, num_steps=5_000))
    config.schedule.update(dict(name="cosine", base_lr=0.01, scale_by_batch=False,
                                warmup_epochs=1.0))
    config.eval.update(dict(batch_size=500, every_steps=1_000))
    config.checkpoint.every_steps = 1_000
    return config
