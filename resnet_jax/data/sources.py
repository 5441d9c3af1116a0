"""What `data.name` names, for both pipelines (`pipeline` on the hosts, `on_device`): its classes,
its splits and their sizes, and the checks that read no image.

Sources: a TFDS image-classification data set by name (`imagenet2012`, `cifar10`, ...;
`data.data_dir`), `imagefolder:PATH`, `digits` and `fake` (synthetic, made by the pipeline).

Split specs. A TFDS data set's are TFDS's own. The others' are read here with TFDS's meaning:
NAME or NAME[START:END], START and END both example counts or both percentages of the split
(rounded to the closest example, as TFDS rounds them), negative ones counted from the end;
several joined by '+'.

Image folders: PATH/SPLIT/CLASS/*.jpg|jpeg|png, listed through etils.epath (a local directory or
gs://). The classes are the class directories of all splits, sorted, as TFDS's ImageFolder names
them; a split's files are in class order, then sorted by name.

Digits: scikit-learn's 1,797 8x8 digits scaled from 0-16 to 0-255, resized (`resize_bilinear`)
to image_size x image_size and given 3 equal channels, so the CIFAR networks take them
unchanged; the split is a fixed seeded, class-stratified 1,497 train / 300 test.

Classes. `Source.check_classes` refuses a train split that leaves a class without images (an empty class
directory, a class present only in the eval split, or outside the train part of a sliced split):
a ValueError naming the classes and the split. Checked where the labels are held in memory (image
folders, digits); a TFDS data set's classes are its builder's, not counted from its records.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np
from etils import epath

try:
    import tensorflow_datasets as tfds
except ModuleNotFoundError as error:  # digits and image folders need no TFDS
    if error.name not in ("tensorflow", "tensorflow_datasets"):
        raise
    tfds = None

NAMES = "a TFDS data set name, 'imagefolder:PATH', 'digits' or 'fake'"
FAKE_NUM_TRAIN = 10_000
FAKE_NUM_EVAL = 1_000
FAKE_NUM_CLASSES = 1000
DIGITS_NUM_TEST = 300
DIGITS_SPLIT_SEED = 0
IMAGE_FILES = (".jpg", ".jpeg", ".png")
IMAGE_SIZE = 224  # data.image_size where a config has none
_PART = re.compile(r"^([\w-]+)(?:\[(-?[\d.]+%?)?:(-?[\d.]+%?)?\])?$")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    num_classes: int
    num_train: int  # examples in the train split (all processes together)
    num_eval: int  # examples in the eval split
    image_shape: tuple[int, int, int]  # (height, width, channels); for ten_crop of one crop


class BadImageError(ValueError):
    """Eval images that do not decode: the message names them. The eval iterators raise it once
    the pass has yielded all its batches (`pipeline`), or before the first (`on_device`)."""


class DatasetNotFoundError(FileNotFoundError):
    """A TFDS data set that is not prepared in the data_dir: the message says how to prepare it."""


def get(config, name, default=None):
    """config.name, `default` where it is missing or None (a ConfigDict, a dict or an object)."""
    value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
    return default if value is None else value


def split_rows(spec: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """A split spec (see the module's docstring) of splits of `sizes` rows, as (name, start,
    end) for each part."""
    rows = []
    for part in spec.split("+"):
        match = _PART.match(part.strip())
        if not match or match.group(1) not in sizes:
            raise ValueError(f"split {spec!r} is not a split of this data set: a split is NAME or "
                             f"NAME[START:END] (examples or percentages), joined by '+', NAME one "
                             f"of {', '.join(sorted(sizes))}")
        name, start, end = match.groups()
        if start and end and start.endswith("%") != end.endswith("%"):
            raise ValueError(f"split {spec!r}: a slice takes example counts or percentages, not "
                             f"both")
        n = sizes[name]
        r = range(n)[slice(_boundary(start, n, spec), _boundary(end, n, spec))]
        rows.append((name, r.start, max(r.stop, r.start)))
    return rows


def _boundary(text: str | None, n: int, spec: str) -> int | None:
    if not text:
        return None
    try:
        if text.endswith("%"):
            return int(round(float(text[:-1]) * n / 100.0))
        return int(text)
    except ValueError:
        raise ValueError(f"split {spec!r}: {text!r} is neither an example count nor a "
                         f"percentage") from None


def process_slices(n: int, parts: int) -> tuple[list[int], list[int]]:
    """(starts, ends) of `parts` contiguous slices of range(n), sizes differing by at most one,
    that cover it: each process's slice of a split."""
    starts = [n * k // parts for k in range(parts)]
    return starts, starts[1:] + [n]


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, C) -> (N, size, size, C) float32, as `tf.image.resize(method="bilinear",
    antialias=False)` computes it: half-pixel centres, edges clamped, float32 interpolation."""
    def axis(n_in):
        x = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / size) \
            - np.float32(0.5)
        low = np.floor(x)
        lerp = (x - low).astype(np.float32)
        return (np.clip(low, 0, n_in - 1).astype(np.int64),
                np.clip(np.ceil(x), 0, n_in - 1).astype(np.int64), lerp)

    images = images.astype(np.float32)
    y0, y1, ly = axis(images.shape[1])
    x0, x1, lx = axis(images.shape[2])
    lx = lx[None, None, :, None]
    top = images[:, y0][:, :, x0] + (images[:, y0][:, :, x1] - images[:, y0][:, :, x0]) * lx
    bottom = images[:, y1][:, :, x0] + (images[:, y1][:, :, x1] - images[:, y1][:, :, x0]) * lx
    return top + (bottom - top) * ly[None, :, None, None]


def to_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, C) pixels as uint8 (N, size, size, C), resized where they are of another size."""
    if images.shape[1:3] == (size, size):
        return images.astype(np.uint8)
    return np.clip(np.round(resize_bilinear(images, size)), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def digits(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 (N, S, S, 3) images, int64 labels) of the digits (module docstring)."""
    from sklearn import datasets, model_selection  # pylint: disable=import-outside-toplevel

    loaded = datasets.load_digits()
    images = to_uint8(np.round(loaded.images * (255.0 / 16.0))[..., None], image_size)
    images = np.repeat(images, 3, axis=-1)
    labels = loaded.target.astype(np.int64)
    train, test = model_selection.train_test_split(
        np.arange(len(labels)), test_size=DIGITS_NUM_TEST, random_state=DIGITS_SPLIT_SEED,
        stratify=labels)
    return {name: (images[np.sort(rows)], labels[np.sort(rows)])
            for name, rows in (("train", train), ("test", test))}


@functools.lru_cache(maxsize=None)
def folder(root: str) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]]]:
    """(class names, split -> [(image path, label)]) of an image folder (module docstring)."""
    path = epath.Path(root)
    if not path.is_dir():
        raise ValueError(f"data.name='imagefolder:{root}': no such directory")
    listing = {split.name: {c.name: sorted(str(f) for f in c.iterdir()
                                           if f.name.lower().endswith(IMAGE_FILES))
                            for c in split.iterdir() if c.is_dir()}
               for split in path.iterdir() if split.is_dir()}
    names = sorted({c for classes in listing.values() for c in classes})
    files = {split: [(f, names.index(c)) for c in sorted(classes) for f in classes[c]]
             for split, classes in sorted(listing.items())}
    if not any(files.values()):
        raise ValueError(f"data.name='imagefolder:{root}': no SPLIT/CLASS/*.jpg|jpeg|png files")
    return tuple(names), files


def _prepare_help(name: str, builder) -> str:
    data_dir = os.path.dirname(os.path.dirname(builder.data_dir))  # <data_dir>/<name>/<version>
    if name == "imagenet2012":
        manual = os.path.join(data_dir, "downloads", "manual")
        return (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in "
                f"{manual}/ and run: tfds build imagenet2012 --data_dir={data_dir}")
    return f"run: tfds build {name} --data_dir={data_dir} (downloads and prepares it)"


@functools.lru_cache(maxsize=None)
def _tfds_builder(name: str, data_dir: str | None):
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"data.name={name!r} is not {NAMES}") from None
    if not builder.is_prepared():
        raise DatasetNotFoundError(
            f"data set {name!r} is not prepared in data_dir {data_dir or '(TFDS default)'} "
            f"(searched {builder.data_dir}); to prepare it, {_prepare_help(name, builder)}")
    return builder


@dataclasses.dataclass(frozen=True)
class Source:
    """What `data.name` names in `config` (the data config): its classes and splits."""

    config: object

    @functools.cached_property
    def name(self) -> str:
        name = get(self.config, "name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"data.name={name!r} is not {NAMES}")
        return name

    @property
    def is_folder(self) -> bool:
        return self.name.startswith("imagefolder:")

    @property
    def is_tfds(self) -> bool:
        return not (self.is_folder or self.name in ("digits", "fake"))

    @property
    def root(self) -> str:
        """An image folder's directory."""
        return os.path.expanduser(self.name.split(":", 1)[1])

    @property
    def image_size(self) -> int:
        return int(get(self.config, "image_size", IMAGE_SIZE))

    @functools.cached_property
    def builder(self):
        """A TFDS data set's builder; ValueError where TFDS is not installed."""
        if tfds is None:
            raise ValueError(f"data.name={self.name!r} is read through TFDS, which needs "
                             f"tensorflow and tensorflow-datasets (not installed); digits and "
                             f"imagefolder:PATH need neither")
        return _tfds_builder(self.name, get(self.config, "data_dir"))

    @property
    def tfds_keys(self) -> tuple[str, str]:
        """The (image, label) features of a TFDS data set's examples."""
        keys = self.builder.info.supervised_keys
        return tuple(keys) if keys and len(keys) == 2 else ("image", "label")

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The classes' names where they are known without TFDS (digits, image folders)."""
        if self.name == "digits":
            return tuple(map(str, range(10)))
        if self.is_folder:
            return folder(self.root)[0]
        return None

    @property
    def num_classes(self) -> int:
        if self.name == "fake":
            return int(get(self.config, "num_classes", FAKE_NUM_CLASSES))
        if not self.is_tfds:
            return len(self.class_names)
        return self.builder.info.features[self.tfds_keys[1]].num_classes

    def split(self, train: bool) -> str:
        """The spec of the train split (data.train_split) or of the eval split."""
        if train:
            return get(self.config, "train_split", "train")
        default = "validation" if self.name == "imagenet2012" else "test"
        return get(self.config, "eval_split", default)

    @functools.cached_property
    def labels(self) -> dict[str, np.ndarray] | None:
        """split -> int64 labels, in the order of its rows, where held (digits, image folders):
        made once, as each size and check reads them."""
        if self.name == "digits":
            return {k: v[1] for k, v in digits(self.image_size).items()}
        if self.is_folder:
            return {k: np.array([label for _, label in v], np.int64)
                    for k, v in folder(self.root)[1].items()}
        return None

    def sizes(self) -> dict[str, int]:
        """split -> rows, of a source whose specs are read here (not TFDS)."""
        if self.name == "fake":
            num_eval = int(get(self.config, "fake_num_eval", FAKE_NUM_EVAL))
            return {"train": int(get(self.config, "fake_num_train", FAKE_NUM_TRAIN)),
                    "validation": num_eval, "test": num_eval}
        return {k: len(v) for k, v in self.labels.items()}

    def rows(self, spec: str) -> list[tuple[str, int, int]]:
        """`split_rows` of a spec of a source whose specs are read here (not TFDS)."""
        return split_rows(spec, self.sizes())

    def size(self, spec: str) -> int:
        """The examples of split spec `spec`; ValueError (one line) for a spec of no split."""
        if not self.is_tfds:
            return sum(end - start for _, start, end in self.rows(spec))
        try:
            return self.builder.info.splits[spec].num_examples
        except (KeyError, ValueError) as e:
            raise ValueError(f"split {spec!r} is not a split of {self.name!r} (splits: "
                             f"{', '.join(self.builder.info.splits)}): {e}") from None

    def check_num_classes(self) -> None:
        """ValueError (one line) for a data.num_classes other than the data set's."""
        wanted = get(self.config, "num_classes")
        if wanted is not None and self.name != "fake" and int(wanted) != self.num_classes:
            raise ValueError(f"data.num_classes={wanted} but data set {self.name!r} has "
                             f"{self.num_classes} classes")

    def check_classes(self) -> None:
        """`check_classes` of the train split where the labels are held (image folders, digits):
        counting a TFDS data set's would read the split (ImageNet's: minutes)."""
        labels = self.labels
        if labels is not None:
            spec = self.split(train=True)
            check_classes(self.name, self.class_names, labels, self.rows(spec), spec)

    def info(self) -> DataInfo:
        """The data's sizes; ValueError (one line) for a bad split, class count, or a class
        without training images."""
        self.check_num_classes()
        info = DataInfo(num_classes=self.num_classes, num_train=self.size(self.split(train=True)),
                        num_eval=self.size(self.split(train=False)),
                        image_shape=(self.image_size, self.image_size, 3))
        self.check_classes()
        return info


def check_classes(name: str, class_names, labels: dict[str, np.ndarray],
                  rows: list[tuple[str, int, int]], split: str) -> None:
    """Raises ValueError (one line) unless every class has images in the train split `split`,
    rows `rows` ((split name, start, end), as `split_rows` gives) of the splits' `labels`: a
    class the model never sees it can never predict, and its eval images would lower the
    accuracy unnoticed. The line names the classes and where their images are."""
    present = np.zeros(len(class_names), bool)
    for part, start, end in rows:
        present[labels[part][start:end]] = True
    missing = np.flatnonzero(~present).tolist()
    if not missing:
        return
    names = [class_names[c] for c in missing]
    shown = ", ".join(map(repr, names[:10])) + (f" and {len(names) - 10} more" if len(names) > 10
                                                else "")
    where = "; ".join(f"{names[k]!r} has {_images_by_split(labels, c)}"
                      for k, c in enumerate(missing[:3]))
    one = len(missing) == 1
    raise ValueError(f"data.name={name!r}: {'class' if one else 'classes'} {shown} "
                     f"{'has' if one else 'have'} no images in data.train_split={split!r} "
                     f"({where}); every class needs training images")


def _images_by_split(labels: dict[str, np.ndarray], label: int) -> str:
    counts = {part: int((values == label).sum()) for part, values in sorted(labels.items())}
    found = [f"{count} in split {part!r}" for part, count in counts.items() if count]
    return ", ".join(found) if found else "none in any split"
