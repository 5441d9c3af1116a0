"""The shared defaults: the paper's ImageNet recipe (Sec. 3.4) for ResNet-50. Every config starts here."""

import ml_collections

from configs import arguments

# The ImageNet configs' BN groups by their argument `bn=`: "paper" (the default), BN over each 32
# examples: the paper's batch of 256 was normalised on each of its 8 GPUs (Caffe's BN, per GPU),
# as fb.resnet.torch and Goyal et al. 2017 (n = 32 per worker) did too; "global", over the
# whole batch, the same on any device count. None of this changes CIFAR's (configs/cifar.py).
IMAGENET_BN_GROUPS = {"paper": 32, "global": None}
IMAGENET_ARGUMENTS = {"bn": ("paper", '"paper": BN over each 32 examples, the paper\'s per-GPU BN; '
                                      '"global": over the whole batch')}


def imagenet_bn_group_size(arg: str | None, config_file: str) -> int | None:
    """model.bn_group_size of the ImageNet config `config_file` given `arg` ("bn=paper" or
    "bn=global"; none: paper)."""
    bn = arguments.choice(arguments.parse(arg, IMAGENET_ARGUMENTS, config_file), "bn", IMAGENET_BN_GROUPS,
                          config_file)
    return IMAGENET_BN_GROUPS[bn]


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Initialisation, data order and augmentation.
    config.seed = 0

    config.model = ml_collections.ConfigDict(dict(
        name="resnet50",            # resnet{18,34,50,101,152,200}, plain..., cifar_resnet{6n+2},
                                    # cifar_plain{6n+2}, vgg16, vgg19, vgg16_bn, vgg19_bn
        block=ml_collections.config_dict.placeholder(str),  # None: the name's; "basic" or
                                    # "bottleneck" (CIFAR: the 9n+2 networks of He et al. 2016)
        shortcut="B",               # Sec. 3.3: "A" zero-padded identity, "B" projections where
                                    # the shape changes, "C" projections on every block
        stride_on="1x1",            # a bottleneck's stride: "1x1", the paper's; "3x3", v1.5
                                    # (torchvision)
        block_order="post",         # "post", the paper's; "pre" (He et al. 2016),
                                    # "no_final_relu", "bn_after_add" (Gross and Wilber 2016)
        gate="none",                # "none", the paper's; "highway": T F(x) + (1 - T) shortcut(x)
                                    # (Srivastava et al. 2015)
        gate_bias=-2.0,             # the gates' initial bias: a new block mostly carries
        zero_init_residual=False,   # True: each block's last BN scale starts at 0 (Goyal et al. 2017)
        bn_momentum=0.9,            # running statistics: kept x momentum + batch x (1 - momentum)
        bn_epsilon=1e-5,            # added to the variance
        bn_group_size=ml_collections.config_dict.placeholder(int),  # None: over the whole batch;
                                    # the ImageNet configs: 32, the paper's per-GPU BN (bn=global: None)
        dtype="auto",               # the compute: "auto", bfloat16 on GPUs and TPUs and float32
                                    # on the CPU (mixed precision); "float32"; "bfloat16"
        param_dtype="float32",      # parameters, optimizer state and BN statistics
        width=64,                   # the first stage's channels (CIFAR nets: 16)
        init_fan="fan_in",          # "fan_in": He et al. 2015's normal init over fan_in (Caffe's
                                    # MSRA filler); "fan_out": torchvision's
        scan_blocks=False,          # one scanned block per stage: faster compiles on accelerators
        remat=False,                # recompute each block's activations: less memory, more compute
        drop_path_rate=0.0,         # stochastic depth, not in the paper: the last block's chance
                                    # to drop its branch, 0 at the first (Huang et al. 2016; ResNet
                                    # strikes back: 0.05)
        conv_weight_grad="auto",    # "auto": kernel gradients as matrix products on the CPU, where
                                    # XLA's are slow; "matmul"; "xla"
        init_from="",               # fine-tuning: a torchvision .pth, a .safetensors file or a
                                    # run's workdir to start from (a new classifier if classes differ)
    ))

    config.data = ml_collections.ConfigDict(dict(
        name="imagenet2012",        # a TFDS name, "digits", "fake" or "imagefolder:PATH"
        data_dir=ml_collections.config_dict.placeholder(str),  # TFDS data_dir (local or gs://)
        train_split="train",         # a TFDS split, slices too ("train[:90%]")
        eval_split="validation",     # the split each eval reports on
        image_size=224,              # the crop the network sees, in pixels
        train_preprocess="paper",    # "paper": shorter side in [256, 480], 224 crop, flip (Sec.
                                     # 3.4); "cifar": 4-pixel padding, 32 crop, flip (Sec. 4.2);
                                     # "inception": a random area and aspect crop, flip; "none"
        eval_preprocess="center",    # "center": resize_size, central crop; "ten_crop": the
                                     # paper's 10-crop testing; "multi_scale": its fully
                                     # convolutional testing at eval_scales (Sec. 3.4); "none"
        eval_scales=(224, 256, 384, 480, 640),  # multi_scale: the shorter sides, each with its flip
        resize_size=ml_collections.config_dict.placeholder(int),  # center and ten_crop evals:
                                     # the shorter side before the crops; None: image_size /
                                     # 0.875 (256 for 224, the paper's), any image size alike
        scale_range=(256, 480),      # paper: the shorter side's random range before the crop
        pca_lighting=0.1,            # the standard colour augmentation (Krizhevsky et al. 2012)
        mean=(123.675, 116.28, 103.53),  # per-channel pixel mean, subtracted (0-255 scale)
        std=(58.395, 57.12, 57.375),  # per-channel pixel std, divided by
        subtract_pixel_mean=False,   # True: the training split's per-pixel mean image instead
                                     # of `mean` (Sec. 3.4, 4.2)
        dtype="uint8",               # "uint8": pixels to the devices, normalised there (a
                                     # quarter of the bytes); "float32", "bfloat16": normalised
                                     # on the host
        num_classes=1000,            # checked against the data set's (fake: its class count)
        shuffle_buffer=16_384,       # tf.data shuffle buffer of large TFDS splits, in examples
        resize_method="bilinear",    # every resize's tf.image method: "bilinear", "bicubic",
                                     # "area" or "nearest"
        antialias=False,             # True: torchvision's eval resize, about half the throughput
        cifar_padding=4,             # Sec. 4.2
        in_memory_bytes=2**30,       # TFDS train slices up to this size are shuffled exactly in memory
        fake_num_train=10_000,       # fake: random images in the train split
        fake_num_eval=1_000,         # fake: and in the eval split
        on_device=False,             # True: a small train split (digits, image folders, CIFAR)
                                     # decoded once into device memory, batches gathered and
                                     # augmented inside the train step; needs no TensorFlow
    ))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=256,              # global: across all devices and processes
        num_epochs=120.0,            # about 60e4 iterations at batch 256 (Sec. 3.4)
        num_steps=-1,                # > 0 overrides num_epochs
        loss="cross_entropy",        # the paper's; "binary_cross_entropy": one sigmoid per class
                                     # (ResNet strikes back, Wightman et al. 2021)
        label_smoothing=0.0,         # none in the paper; 0.1 is a modern option (Szegedy et al. 2016)
        bce_target_threshold=ml_collections.config_dict.placeholder(float),  # binary_cross_entropy:
                                     # targets above it 1, the rest 0 (ResNet strikes back: 0.2)
        mixup_alpha=0.0,             # > 0: mixup, lam ~ Beta(alpha, alpha) (Zhang et al. 2018)
        cutmix_alpha=0.0,            # > 0: CutMix, the box's lam ~ Beta(alpha, alpha) (Yun et al. 2019)
        mix_prob=1.0,                # the chance that a batch is mixed, where either is on
        mix_switch_prob=0.5,         # with both on: the chance of CutMix rather than mixup
        ema_decay=0.0,               # > 0: a moving average of the weights, evaluated beside them
                                     # (torchvision's recipe: 0.99998)
        ema_every_steps=32,          # steps between its updates (torchvision: 32)
        ema_adjust=False,            # True: torchvision's decay, adjusted by batch, steps, epochs
        skip_nonfinite=False,        # True: a step with a non-finite loss or gradient changes nothing
    ))
    config.optimizer = ml_collections.ConfigDict(dict(
        name="sgd",                  # "sgd", the paper's; "lars" for batches of 8k and more (You
                                     # et al. 2017); "lamb" (You et al. 2020; ResNet strikes back)
        momentum=0.9,                # Sec. 3.4
        nesterov=False,              # the paper: plain momentum
        weight_decay=1e-4,           # Sec. 3.4 (0.0001)
        weight_decay_mode="l2",      # "l2", the paper's: in the gradient; "decoupled": added
                                     # after momentum
        # The paper decays every parameter (Sec. 3.4; Caffe and fb.resnet.torch alike). False:
        # the modern exemption, kernels only (Goyal et al. 2017 spare BN's scale and bias; later
        # recipes the classifier's bias too).
        decay_bn_and_bias=True,
        # LARS only: each kernel's step is scaled by trust x ||w|| / ||g + weight_decay w||.
        lars_trust_coefficient=0.001,  # You et al. 2017's eta
        lars_eps=0.0,                # added to that denominator
        lars_adapt_bn_and_bias=False,  # as MLPerf's ResNet-50: BN and biases unscaled
        # LAMB only (timm's Lamb defaults): Adam's moments, then the trust ratio ||w|| / ||step||.
        lamb_betas=(0.9, 0.999),     # the moments' decay rates
        lamb_eps=1e-6,               # added to the second moment's square root
        lamb_max_grad_norm=1.0,      # gradients clipped to this global norm first; 0: none
    ))
    config.schedule = ml_collections.ConfigDict(dict(
        name="step",                 # "step", "paper_cifar", "cosine" or "constant"
        base_lr=0.1,                 # Sec. 3.4: "starts from 0.1"
        scale_by_batch=True,         # base_lr x batch / 256 (Goyal et al. 2017)
        boundaries_epochs=(30, 60, 90),  # the paper divides by 10 "when the error plateaus"
        boundaries_steps=(32_000, 48_000),  # paper_cifar: divided by 10 at these steps (Sec. 4.2)
        warmup_lr=0.01,              # the rate of the warm-up of warmup_steps or warmup_until_error
        warmup_steps=0,              # paper_cifar: warmup_lr for this many first steps
        warmup_until_error=0.0,      # > 0: warmup_lr until the training error is below it (Sec. 4.2: 0.8)
        warmup_epochs=0.0,           # step and cosine: a linear warm-up; none in the paper,
                                     # 5 for large batches (Goyal et al. 2017)
        end_lr=0.0,                  # cosine: the rate at the last step (ResNet strikes back: 1e-6)
    ))
    config.eval = ml_collections.ConfigDict(dict(
        batch_size=256,              # global; padded up to a multiple of the devices, masked
        every_steps=5_000,           # steps between evals; also at the last step
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=5_000,           # steps between saves; also at the last step and on a stop
        keep=3,                      # the latest checkpoints kept
        keep_best=True,              # also keep the best by eval accuracy, across restarts
        # A save's time limit (orbax's): where one process's save fails, the others wait for it
        # this long at orbax's barriers before every process stops on the failure.
        timeout_seconds=1200,
    ))
    # A log line (and a metrics.jsonl row) of the train metrics every this many steps.
    config.log_every_steps = 100
    # > 0: a JAX profiler trace of this many steps, into the TensorBoard directory (process 0).
    config.profile_steps = 0
    # JAX's persistent compilation cache: a restart skips most of the compile. "{workdir}" is replaced.
    config.compilation_cache_dir = "{workdir}/compilation_cache"
    # TensorBoard events; "" for none. TensorFlow's own file system writes them (local or gs://).
    config.tensorboard_dir = "{workdir}"
    return config
