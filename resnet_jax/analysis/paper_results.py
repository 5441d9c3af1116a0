"""The errors He et al. 2015 report, each with its table, and when a run may stand beside one.

A figure is comparable with a run only for the same network, data set, eval split, input size
and test protocol: the paper's ImageNet figures (Tables 2, 3) are 10-crop errors on the
validation set, about 2 points below a centre crop's; its CIFAR-10 figures (Table 6) are test
errors of the single 32x32 image. `match` says which figure applies to a config, or why none does.
"""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Result:
    table: str               # where the paper reports it
    data: str                # the data set, as data.name names it
    protocol: str            # the test protocol, as data.eval_preprocess names it
    model: str               # as models.create names it
    shortcut: str | None     # A, B or C; None for a plain network
    top1: float              # top-1 error (%); ResNet-110: the best of `runs`
    top5: float | None = None
    mean: float | None = None  # mean and std over `runs` runs, where the paper gives them
    std: float | None = None
    runs: int | None = None


# Top-5 errors are given only where checked against a second source (the authors' model page,
# github.com/KaimingHe/deep-residual-networks, rounds Table 3's to one decimal). Table 4's
# multi-scale results and the other top-5 errors are left out until checked against the paper.
PAPER = (
    # Table 2: top-1, 10-crop; the ResNets use option A (zero-padding) shortcuts (Sec. 4.1).
    Result("Table 2", "imagenet2012", "ten_crop", "plain18", None, 27.94),
    Result("Tables 2, 3", "imagenet2012", "ten_crop", "plain34", None, 28.54),
    Result("Table 2", "imagenet2012", "ten_crop", "resnet18", "A", 27.88),
    Result("Tables 2, 3", "imagenet2012", "ten_crop", "resnet34", "A", 25.03),
    # Table 3: 10-crop; options B and C, and the bottleneck networks with option B.
    Result("Table 3", "imagenet2012", "ten_crop", "resnet34", "B", 24.52),
    Result("Table 3", "imagenet2012", "ten_crop", "resnet34", "C", 24.19),
    Result("Table 3", "imagenet2012", "ten_crop", "resnet50", "B", 22.85, top5=6.71),
    Result("Table 3", "imagenet2012", "ten_crop", "resnet101", "B", 21.75, top5=6.05),
    Result("Table 3", "imagenet2012", "ten_crop", "resnet152", "B", 21.43, top5=5.71),
    # Table 6: CIFAR-10 test error, option A. ResNet-110 is "best (mean +- std)" of 5 runs. The
    # plain networks' errors are only drawn (Fig. 6), not tabulated.
    Result("Table 6", "cifar10", "none", "cifar_resnet20", "A", 8.75),
    Result("Table 6", "cifar10", "none", "cifar_resnet32", "A", 7.51),
    Result("Table 6", "cifar10", "none", "cifar_resnet44", "A", 7.17),
    Result("Table 6", "cifar10", "none", "cifar_resnet56", "A", 6.97),
    Result("Table 6", "cifar10", "none", "cifar_resnet110", "A", 6.43, mean=6.61, std=0.16, runs=5),
    Result("Table 6", "cifar10", "none", "cifar_resnet1202", "A", 7.93),
)

# How each data set was tested: the split (ImageNet's validation set; CIFAR's test set, not a
# split held out of the training set) and the input size.
SPLIT = {"imagenet2012": "validation", "cifar10": "test"}
IMAGE_SIZE = {"imagenet2012": 224, "cifar10": 32}
# The paper's networks (Table 1, Sec. 4.2): post-activation blocks of the name's kind, no gates,
# the stride on the first 1x1 convolution, 64 (ImageNet) or 16 (CIFAR) filters in the first stage.
NETWORK = {"block_order": "post", "gate": "none", "block": None, "stride_on": "1x1"}
WIDTH = {"imagenet2012": 64, "cifar10": 16}


def match(config: Any) -> tuple[Result | None, str]:
    """(the paper's result for `config`'s run, "") when every condition holds; else (None, why
    not), why being "" where the paper has no figure for the network on the data set at all."""
    model, data = config.model, config.data
    plain = "plain" in model.name
    shortcut = None if plain else model.get("shortcut")
    results = [r for r in PAPER if (r.data, r.model, r.shortcut) == (data.name, model.name, shortcut)]
    if not results:
        return None, ""
    tables = " and ".join(r.table for r in results)
    expected = {**NETWORK, "width": WIDTH[data.name]}
    differs = [f"{k}={model.get(k)}" for k, v in expected.items() if model.get(k, v) != v]
    if differs:
        return None, f"not the paper's network ({', '.join(differs)}; {tables})"
    if data.eval_split != SPLIT[data.name]:
        return None, f"{tables}: {SPLIT[data.name]} split; this run: {data.eval_split}"
    if data.image_size != IMAGE_SIZE[data.name]:
        return None, f"{tables}: {IMAGE_SIZE[data.name]}px; this run: {data.image_size}px"
    for result in results:
        if result.protocol == data.eval_preprocess:
            return result, ""
    return None, (f"{tables}: {', '.join(r.protocol for r in results)} testing; this run: "
                  f"{data.eval_preprocess}")
