"""`data.on_device=True`: a small train split decoded once into device memory, each step's batch
gathered and augmented inside the jitted train step. No TensorFlow is needed for digits and image
folders.

Sources: `digits`, `imagefolder:PATH` (SPLIT/CLASS/*.jpg|jpeg|png, decoded with PIL) and TFDS
data sets of fixed-size images (cifar10, cifar100; read once through TFDS, which needs
TensorFlow). Images are decoded and resized (bilinear, as TensorFlow's `tf.image.resize` without
antialiasing) to image_size x image_size once, held as uint8, with int32 labels.

Placement: a train split of at most `REPLICATE_BYTES` decoded bytes is copied to every device
(each step's gather is local); a larger one, up to `MAX_BYTES`, is split over the mesh's batch
axes, each device holding 1/D of the rows, and a step gathers its batch with one reduce-scatter
of the batch's pixels. A split larger than `MAX_BYTES` is refused.

The batch of step k (0-based: the state's step counter before the step) is a pure function of
(seed, k): positions k*B .. k*B+B-1 of the stream, position p being row perm_e[p % n] of epoch
e = p // n, perm_e a permutation drawn from a key folded from the seed and e; the crops and
flips are drawn from a key folded from the seed and k. Nothing depends on the host or process
count, and a run resumed at step k gathers what an uninterrupted one would.

Augmentation (He et al., Sec. 4.2): the uint8 pixels normalised as the host pipeline does for the
config ((x - mean) / std, the per-pixel mean image when `subtract_pixel_mean`), then for
`train_preprocess="cifar"` `cifar_padding` zero pixels on each side, a random image_size crop
(offsets uniform in [0, 2 * cifar_padding]) and a horizontal flip with probability 1/2;
`"none"` normalises only.

Eval: the eval split is decoded once into host memory; each evaluation sends it, per process a
contiguous slice in padded batches with a mask (as `pipeline.eval_iterator`), as uint8, normalised
inside the eval step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax.data import pipeline, preprocess

REPLICATE_BYTES = 2**28  # 256 MiB: CIFAR-10's train split (153.6 MB) is on every device
MAX_BYTES = 2**32  # 4 GiB of decoded uint8 pixels, over all devices
SUPPORTED = ("digits, imagefolder:PATH, or a TFDS data set of fixed-size images (cifar10, "
             "cifar100)")
_IMAGE_FILES = (".jpg", ".jpeg", ".png")
_SHUFFLE, _AUGMENT = 0, 1  # what a key folded from the seed is for
_SPLIT = re.compile(r"^(\w+)(?:\[(-?\d*):(-?\d*)\])?$")


def _get(config, name, default=None):
    value = config.get(name, None)
    return default if value is None else value


def enabled(data_config) -> bool:
    """data.on_device: the train split in device memory, batches made inside the step."""
    return bool(_get(data_config, "on_device", False))


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


def _to_uint8(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images.astype(np.uint8)
    return np.clip(np.round(resize_bilinear(images, size)), 0, 255).astype(np.uint8)


def _split_rows(spec: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """A split spec of `digits` or an image folder: NAME or NAME[START:END] (integers, as a
    Python slice), several joined by '+'; as (name, start, end)."""
    rows = []
    for part in spec.split("+"):
        match = _SPLIT.match(part.strip())
        if not match or match.group(1) not in sizes:
            raise ValueError(f"split {spec!r}: with data.on_device=True a split is NAME or "
                             f"NAME[START:END] (integers), joined by '+', NAME one of "
                             f"{', '.join(sorted(sizes))}")
        name, start, end = match.groups()
        r = range(sizes[name])[slice(int(start) if start else None, int(end) if end else None)]
        rows.append((name, r.start, max(r.stop, r.start)))
    return rows


# ---- sources: images as uint8 (N, S, S, 3) and int32 labels, in a fixed order ---------------


@functools.lru_cache(maxsize=None)
def _digits(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The split of `pipeline._digits_table`, the same 1,497 / 300 rows, resized as it resizes."""
    from sklearn import datasets, model_selection  # pylint: disable=import-outside-toplevel

    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.float32)[..., None]
    if image_size != images.shape[1]:
        images = np.clip(np.round(resize_bilinear(images, image_size)), 0, 255)
    images = np.repeat(images.astype(np.uint8), 3, axis=-1)
    labels = digits.target.astype(np.int32)
    train, test = model_selection.train_test_split(
        np.arange(len(labels)), test_size=pipeline.DIGITS_NUM_TEST,
        random_state=pipeline.DIGITS_SPLIT_SEED, stratify=labels)
    return {name: (images[np.sort(rows)], labels[np.sort(rows)])
            for name, rows in (("train", train), ("test", test))}


@functools.lru_cache(maxsize=None)
def _folder_files(root: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(class names, split -> [(path, label)]): the classes sorted over all splits, as TFDS's
    ImageFolder names them; the files sorted."""
    path = epath.Path(root)
    if not path.is_dir():
        raise ValueError(f"data.name='imagefolder:{root}': no such directory")
    listing = {split.name: {c.name: sorted(str(f) for f in c.iterdir()
                                           if f.name.lower().endswith(_IMAGE_FILES))
                            for c in split.iterdir() if c.is_dir()}
               for split in path.iterdir() if split.is_dir()}
    names = sorted({c for classes in listing.values() for c in classes})
    files = {split: [(f, names.index(c)) for c in sorted(classes) for f in classes[c]]
             for split, classes in sorted(listing.items())}
    if not any(files.values()):
        raise ValueError(f"data.name='imagefolder:{root}': no SPLIT/CLASS/*.jpg|jpeg|png files")
    return names, files


def _decode(path: str, image_size: int) -> np.ndarray:
    from PIL import Image  # pylint: disable=import-outside-toplevel

    with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as image:
        pixels = np.asarray(image.convert("RGB"))
    return _to_uint8(pixels[None], image_size)[0]


@dataclasses.dataclass(frozen=True)
class _Source:
    """What `data.name` names, for data.on_device=True: classes, split sizes, decoded splits."""

    config: object

    @functools.cached_property
    def name(self) -> str:
        name = _get(self.config, "name")
        if not isinstance(name, str) or name in ("", "fake"):  # anything else may be TFDS's
            raise ValueError(f"data.on_device=True takes {SUPPORTED}; got data.name={name!r}")
        return name

    @property
    def image_size(self) -> int:
        return preprocess.settings(self.config).image_size

    @functools.cached_property
    def _tfds(self):
        if pipeline.tfds is None:
            raise ValueError(f"data.name={self.name!r} with data.on_device=True reads the TFDS "
                             f"data set once, which needs TensorFlow and tensorflow-datasets "
                             f"(not installed); digits and imagefolder:PATH need neither")
        builder = pipeline._tfds_builder(self.name, _get(self.config, "data_dir"))  # pylint: disable=protected-access
        image_key, label_key = pipeline._tfds_keys(builder)  # pylint: disable=protected-access
        shape = tuple(builder.info.features[image_key].shape)
        if None in shape or len(shape) != 3:
            raise ValueError(f"data.on_device=True takes {SUPPORTED}; data.name={self.name!r} "
                             f"has images of shape {shape} (use data.on_device=False)")
        return builder, image_key, label_key

    @property
    def num_classes(self) -> int:
        if self.name == "digits":
            return 10
        if self.name.startswith("imagefolder:"):
            return len(_folder_files(self._root)[0])
        builder, _, label_key = self._tfds
        return builder.info.features[label_key].num_classes

    @property
    def _root(self) -> str:
        return os.path.expanduser(self.name.split(":", 1)[1])

    def split(self, train: bool) -> str:
        if train:
            return _get(self.config, "train_split", "train")
        return _get(self.config, "eval_split", "test")

    def _sizes(self) -> dict[str, int]:
        if self.name == "digits":
            return {k: len(v[1]) for k, v in _digits(self.image_size).items()}
        return {k: len(v) for k, v in _folder_files(self._root)[1].items()}

    def size(self, spec: str) -> int:
        if self.name == "digits" or self.name.startswith("imagefolder:"):
            return sum(end - start for _, start, end in _split_rows(spec, self._sizes()))
        builder = self._tfds[0]
        try:
            return builder.info.splits[spec].num_examples
        except (KeyError, ValueError) as e:
            raise ValueError(f"split {spec!r} is not a split of {self.name!r} (splits: "
                             f"{', '.join(builder.info.splits)}): {e}") from None

    def check_classes(self) -> None:
        """`pipeline.check_classes` for digits and image folders, from their labels (nothing
        decoded); TFDS's class count is its builder's."""
        if self.name == "digits":
            splits = _digits(self.image_size)
            names, labels = [str(c) for c in range(10)], {k: v[1] for k, v in splits.items()}
        elif self.name.startswith("imagefolder:"):
            names, files = _folder_files(self._root)
            labels = {k: np.array([label for _, label in v], np.int64) for k, v in files.items()}
        else:
            return
        spec = self.split(train=True)
        pipeline.check_classes(self.name, names, labels, _split_rows(spec, self._sizes()), spec)

    def load(self, spec: str) -> tuple[np.ndarray, np.ndarray]:
        """The split decoded: uint8 (N, S, S, 3) and int32 (N,), in a fixed order."""
        size = self.image_size
        if self.name == "digits":
            splits = _digits(size)
            parts = [(splits[n][0][a:b], splits[n][1][a:b])
                     for n, a, b in _split_rows(spec, self._sizes())]
        elif self.name.startswith("imagefolder:"):
            files = _folder_files(self._root)[1]
            chosen = [f for n, a, b in _split_rows(spec, self._sizes()) for f in files[n][a:b]]
            # Threads only read and decode files; no JAX operation runs on them.
            with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                images = list(pool.map(lambda f: _decode(f[0], size), chosen))
            parts = [(np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
                      np.array([label for _, label in chosen], np.int32))]
        else:
            builder, image_key, label_key = self._tfds
            arrays = pipeline.tfds.as_numpy(builder.as_dataset(split=spec, batch_size=-1,
                                                               shuffle_files=False))
            images = arrays[image_key]
            if images.shape[-1] == 1:
                images = np.repeat(images, 3, axis=-1)
            parts = [(_to_uint8(images, size), arrays[label_key].astype(np.int32))]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


# ---- checks, and the decoded splits ----------------------------------------------------------


def info(config) -> pipeline.DataInfo:
    """`pipeline.info` for data.on_device=True; raises ValueError (one line) for what it cannot hold:
    another source, a train split of more than MAX_BYTES decoded. Decodes nothing."""
    s = preprocess.settings(config)
    source = _Source(config)
    num_classes = source.num_classes
    wanted = _get(config, "num_classes")
    if wanted is not None and int(wanted) != num_classes:
        raise ValueError(f"data.num_classes={wanted} but data set {source.name!r} has "
                         f"{num_classes} classes")
    if s.eval_preprocess in preprocess.MANY_VIEWS:
        raise ValueError(f"data.eval_preprocess={s.eval_preprocess!r} needs data.on_device=False: "
                         f"on the devices each eval image is taken whole at data.image_size "
                         f"(data.eval_preprocess 'none' or 'center')")
    source.check_classes()
    num_train = source.size(source.split(train=True))
    decoded = num_train * s.image_size**2 * 3
    if decoded > MAX_BYTES:
        raise ValueError(f"data.on_device=True holds at most {MAX_BYTES:,} bytes of decoded train "
                         f"images; {source.name!r} at image_size {s.image_size} is {decoded:,} "
                         f"(use data.on_device=False)")
    return pipeline.DataInfo(num_classes=num_classes, num_train=num_train,
                             num_eval=source.size(source.split(train=False)),
                             image_shape=(s.image_size, s.image_size, 3))


_FIELDS = ("name", "data_dir", "train_split", "eval_split", "image_size")


@functools.lru_cache(maxsize=4)
def _split(key: tuple, train: bool) -> tuple[np.ndarray, np.ndarray]:
    config = dict(key)
    source = _Source(_Fields(config))
    spec = source.split(train)
    images, labels = source.load(spec)
    logging.info("data.on_device: %s %s decoded once: %d images of %s, %d bytes",
                 source.name, spec, len(labels), images.shape[1:], images.nbytes)
    return images, labels


class _Fields(dict):
    def get(self, name, default=None):
        return super().get(name, default)


def split_arrays(config, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The train or eval split decoded (uint8 images, int32 labels), once per process."""
    return _split(tuple((f, _get(config, f)) for f in _FIELDS), train)


def pixel_mean(config) -> np.ndarray | None:
    """The per-pixel mean of the decoded train images (Sec. 4.2), float32; None unless
    `data.subtract_pixel_mean`."""
    if not _get(config, "subtract_pixel_mean", False):
        return None
    images, _ = split_arrays(config, train=True)
    return (images.sum(axis=0, dtype=np.float64) / max(len(images), 1)).astype(np.float32)


# ---- on the devices -------------------------------------------------------------------------


def _normalise(images: jax.Array, s: preprocess.Settings, mean_image) -> jax.Array:
    """(x - mean) / std in float32, as the host pipeline's `_finish` computes it."""
    mean = jnp.asarray(mean_image if mean_image is not None else np.float32(s.mean))
    scale = np.float32(1.0) / np.float32(s.std)
    return (images.astype(jnp.float32) - mean) * scale


def crop_flip_draws(key: jax.Array, n: int, padding: int):
    """Each image's crop offsets (dy, dx), uniform in [0, 2 * padding], and flip, p = 1/2."""
    ky, kx, kf = jax.random.split(key, 3)
    return (jax.random.randint(ky, (n,), 0, 2 * padding + 1),
            jax.random.randint(kx, (n,), 0, 2 * padding + 1), jax.random.bernoulli(kf, 0.5, (n,)))


def pad_crop_flip(images: jax.Array, dy, dx, flip, padding: int) -> jax.Array:
    """Sec. 4.2: `padding` zero pixels on each side, the crop of the input's size at (dy, dx) of
    the padded image, flipped left to right where `flip`."""
    size_y, size_x, channels = images.shape[1:]
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    crop = jax.vmap(lambda image, y, x: jax.lax.dynamic_slice(image, (y, x, 0),
                                                              (size_y, size_x, channels)))
    images = crop(padded, dy, dx)
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def augment(images: jax.Array, key: jax.Array, s: preprocess.Settings, mean_image=None):
    """Normalised images of one train batch, with Sec. 4.2's augmentation for `cifar`: zero
    padding of `cifar_padding` pixels after normalising (the padded pixels are the mean, as on
    the host), a random image_size crop, a random horizontal flip (`none`: normalised only).
    Traced inside the train step."""
    images = _normalise(images, s, mean_image)
    if s.train_preprocess == "cifar":
        dy, dx, flip = crop_flip_draws(key, images.shape[0], s.cifar_padding)
        images = pad_crop_flip(images, dy, dx, flip, s.cifar_padding)
    return images.astype(jnp.bfloat16) if s.dtype == "bfloat16" else images


def rows(seed: int, step: jax.Array, batch_size: int, n: int) -> jax.Array:
    """The rows of step `step`'s batch: positions step*B .. step*B+B-1 of the stream, epoch e
    shuffled by a permutation keyed by (seed, e). B <= n, so a batch spans at most two epochs."""
    positions = step.astype(jnp.int32) * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
    epoch = positions // n
    shuffle = jax.random.fold_in(jax.random.key(seed), _SHUFFLE)
    first = epoch[0]
    perms = jnp.stack([jax.random.permutation(jax.random.fold_in(shuffle, first + k), n)
                       for k in (0, 1)])
    return perms[epoch - first, positions % n]


@dataclasses.dataclass(frozen=True)
class Resident:
    """The train split in device memory and the function that makes each step's batch."""

    arrays: dict  # "image": uint8 (rows, S, S, 3), "label": int32 (rows,), as jax.Arrays
    n: int  # real rows (a sharded table is padded to a multiple of the devices)
    sharded: bool
    mesh: object

    @property
    def shardings(self):
        return jax.tree.map(lambda a: a.sharding, self.arrays)

    def batch_fn(self, config, batch_size: int, seed: int):
        """fn(arrays, step) -> {"image": normalised and augmented, "label"}, traced in the step."""
        s = preprocess.settings(config)
        mean_image = pixel_mean(config)
        axes = self.mesh.axis_names
        batch_sharding = NamedSharding(self.mesh, PartitionSpec(axes))
        n, sharded, mesh = self.n, self.sharded, self.mesh

        def fn(arrays, step):
            idx = rows(seed, step, batch_size, n)
            if sharded:
                images = _gather_sharded(arrays["image"], idx, mesh)
            else:
                idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
                images = arrays["image"][idx]
            labels = jax.lax.with_sharding_constraint(arrays["label"][idx], batch_sharding)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT), step)
            images = jax.lax.with_sharding_constraint(augment(images, key, s, mean_image),
                                                      batch_sharding)
            return {"image": images, "label": labels}

        return fn


def _gather_sharded(table: jax.Array, idx: jax.Array, mesh) -> jax.Array:
    """table[idx] for a table split over the batch axes: each device takes the rows it holds
    (zeros for the others) and one reduce-scatter sums them into the batch, split the same way."""
    axes = mesh.axis_names

    def local(shard, idx):
        count = shard.shape[0]
        offset = idx - jax.lax.axis_index(axes) * count
        held = (offset >= 0) & (offset < count)
        picked = shard[jnp.clip(offset, 0, count - 1)]
        picked = jnp.where(held[:, None, None, None], picked, jnp.zeros((), shard.dtype))
        return jax.lax.psum_scatter(picked, axes, scatter_dimension=0, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(axes), PartitionSpec()),
                         out_specs=PartitionSpec(axes))(table, idx)


def place(config, mesh) -> Resident:
    """The decoded train split put on the devices: replicated up to REPLICATE_BYTES, split over
    the batch axes above. Every process decodes the whole split and puts its devices' part."""
    images, labels = split_arrays(config, train=True)
    sharded = images.nbytes > REPLICATE_BYTES
    n = len(labels)
    if sharded:
        devices = mesh.devices.size
        pad = -n % devices
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    spec = PartitionSpec(mesh.axis_names) if sharded else PartitionSpec()
    arrays = {
        "image": jax.make_array_from_callback(images.shape, NamedSharding(mesh, spec),
                                              lambda index: images[index]),
        "label": jax.make_array_from_callback(labels.shape, NamedSharding(mesh, PartitionSpec()),
                                              lambda index: labels[index]),
    }
    logging.info("data.on_device: %d train images (%d bytes) %s", n, images.nbytes,
                 f"split over the {mesh.devices.size} devices" if sharded else
                 "on every device")
    return Resident(arrays, n, sharded, mesh)


def eval_normaliser(config):
    """batch -> batch: the eval split's uint8 pixels normalised as the host pipeline would."""
    s = preprocess.settings(config)
    mean_image = pixel_mean(config)

    def normalise(batch):
        batch = dict(batch)
        image = _normalise(batch["image"], s, mean_image)
        batch["image"] = image.astype(jnp.bfloat16) if s.dtype == "bfloat16" else image
        return batch

    return normalise


def eval_iterator(config, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's contiguous slice of the decoded eval split, uint8, in padded
    batches with a mask; every process yields as many batches (`pipeline.eval_iterator`'s contract)."""
    images, labels = split_arrays(config, train=False)
    starts, ends = pipeline._bounds(len(labels), process_count)  # pylint: disable=protected-access
    num_batches = -(-max(e - s for s, e in zip(starts, ends)) // batch_size)
    lo, hi = starts[process_index], ends[process_index]
    for b in range(num_batches):
        a, z = min(lo + b * batch_size, hi), min(lo + (b + 1) * batch_size, hi)
        pad = batch_size - (z - a)
        yield {"image": np.concatenate([images[a:z], np.zeros((pad, *images.shape[1:]), np.uint8)]),
               "label": np.concatenate([labels[a:z], np.zeros((pad,), np.int32)]),
               "mask": np.arange(batch_size) < z - a}
