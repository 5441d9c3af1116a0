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

Images that do not decode: left out of a train split, each named in the log, as the host
pipeline drops them; in an eval split, a `sources.BadImageError` naming them before the first
batch (an eval counts every example of its split).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax.data import preprocess, sources

REPLICATE_BYTES = 2**28  # 256 MiB: CIFAR-10's train split (153.6 MB) is on every device
MAX_BYTES = 2**32  # 4 GiB of decoded uint8 pixels, over all devices
SUPPORTED = ("digits, imagefolder:PATH, or a TFDS data set of fixed-size images (cifar10, "
             "cifar100)")
_SHUFFLE, _AUGMENT = 0, 1  # what a key folded from the seed is for


def enabled(data_config) -> bool:
    """data.on_device: the train split in device memory, batches made inside the step."""
    return bool(sources.get(data_config, "on_device", False))


# ---- sources: images as uint8 (N, S, S, 3) and int32 labels, in a fixed order ---------------


def _decoded(path: str, image_size: int) -> np.ndarray | str:
    """The image at `path` as uint8 (S, S, 3); or, where it does not decode, why."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    try:
        with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's
        return f"{type(error).__name__}: {' '.join(str(error).split())}"
    return sources.to_uint8(pixels[None], image_size)[0]


def _undecodable(bad: list[tuple[str, str]], where: str, train: bool) -> None:
    """Logs each image of `bad` ((path, why)); raises BadImageError for an eval split."""
    for path, why in bad:
        logging.warning("data.on_device: %s: %s does not decode (%s)%s", where, path, why,
                        "; left out" if train else "")
    if not train:
        k, shown = len(bad), ", ".join(path for path, _ in bad[:5])
        more = f" and {k - 5} more (the log names them all)" if k > 5 else ""
        raise sources.BadImageError(
            f"eval data {where}: {k} image{'s' * (k > 1)} that do{'es' * (k == 1)} not decode: "
            f"{shown}{more}; an eval counts every example of its split, so replace or remove "
            f"{'it' if k == 1 else 'them'}")


@dataclasses.dataclass(frozen=True)
class _Source(sources.Source):
    """`sources.Source` for data.on_device=True: its splits decoded."""

    @functools.cached_property
    def name(self) -> str:
        name = sources.get(self.config, "name")
        if not isinstance(name, str) or name in ("", "fake"):  # anything else may be TFDS's
            raise ValueError(f"data.on_device=True takes {SUPPORTED}; got data.name={name!r}")
        return name

    @property
    def num_classes(self) -> int:
        if self.is_tfds:
            self._check_shape()
        return super().num_classes

    def _check_shape(self) -> None:
        shape = tuple(self.builder.info.features[self.tfds_keys[0]].shape)
        if None in shape or len(shape) != 3:
            raise ValueError(f"data.on_device=True takes {SUPPORTED}; data.name={self.name!r} "
                             f"has images of shape {shape} (use data.on_device=False)")

    def load(self, spec: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """The split decoded: uint8 (N, S, S, 3) and int32 (N,), in a fixed order. An image
        that does not decode is dropped from a train split and named in the log, as the host
        pipeline drops it; in an eval split it is a `sources.BadImageError` naming it."""
        size = self.image_size
        if self.name == "digits":
            splits = sources.digits(size)
            parts = [(splits[n][0][a:b], splits[n][1][a:b].astype(np.int32))
                     for n, a, b in self.rows(spec)]
        elif self.is_folder:
            files = sources.folder(self.root)[1]
            chosen = [f for n, a, b in self.rows(spec) for f in files[n][a:b]]
            # Threads only read and decode files; no JAX operation runs on them.
            with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                decoded = list(pool.map(lambda f: _decoded(f[0], size), chosen))
            bad = [(path, error) for (path, _), error in zip(chosen, decoded) if isinstance(error, str)]
            if bad:
                _undecodable(bad, f"data.name={self.name!r}, split {spec!r}", train)
            kept = [(image, label) for image, (_, label) in zip(decoded, chosen)
                    if not isinstance(image, str)]
            parts = [(np.stack([image for image, _ in kept]) if kept
                      else np.zeros((0, size, size, 3), np.uint8),
                      np.array([label for _, label in kept], np.int32))]
        else:
            self._check_shape()
            image_key, label_key = self.tfds_keys
            arrays = sources.tfds.as_numpy(self.builder.as_dataset(split=spec, batch_size=-1,
                                                                   shuffle_files=False))
            images = arrays[image_key]
            if images.shape[-1] == 1:
                images = np.repeat(images, 3, axis=-1)
            parts = [(sources.to_uint8(images, size), arrays[label_key].astype(np.int32))]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


# ---- checks, and the decoded splits ----------------------------------------------------------


def info(config) -> sources.DataInfo:
    """`pipeline.info` for data.on_device=True; raises ValueError (one line) for what it cannot hold:
    another source, a train split of more than MAX_BYTES decoded. Decodes nothing."""
    s = preprocess.settings(config)
    if s.eval_preprocess in preprocess.MANY_VIEWS:
        raise ValueError(f"data.eval_preprocess={s.eval_preprocess!r} needs data.on_device=False: "
                         f"on the devices each eval image is taken whole at data.image_size "
                         f"(data.eval_preprocess 'none' or 'center')")
    source = _Source(config)
    result = source.info()
    decoded = result.num_train * s.image_size**2 * 3
    if decoded > MAX_BYTES:
        raise ValueError(f"data.on_device=True holds at most {MAX_BYTES:,} bytes of decoded train "
                         f"images; {source.name!r} at image_size {s.image_size} is {decoded:,} "
                         f"(use data.on_device=False)")
    return result


_FIELDS = ("name", "data_dir", "train_split", "eval_split", "image_size")


@functools.lru_cache(maxsize=4)
def _split(key: tuple, train: bool) -> tuple[np.ndarray, np.ndarray]:
    config = dict(key)
    source = _Source(_Fields(config))
    spec = source.split(train)
    images, labels = source.load(spec, train)
    logging.info("data.on_device: %s %s decoded once: %d images of %s, %d bytes",
                 source.name, spec, len(labels), images.shape[1:], images.nbytes)
    return images, labels


class _Fields(dict):
    def get(self, name, default=None):
        return super().get(name, default)


def split_arrays(config, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The train or eval split decoded (uint8 images, int32 labels), once per process."""
    return _split(tuple((f, sources.get(config, f)) for f in _FIELDS), train)


def pixel_mean(config) -> np.ndarray | None:
    """The per-pixel mean of the decoded train images (Sec. 4.2), float32; None unless
    `data.subtract_pixel_mean`."""
    if not sources.get(config, "subtract_pixel_mean", False):
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
    starts, ends = sources.process_slices(len(labels), process_count)
    num_batches = -(-max(e - s for s, e in zip(starts, ends)) // batch_size)
    lo, hi = starts[process_index], ends[process_index]
    for b in range(num_batches):
        a, z = min(lo + b * batch_size, hi), min(lo + (b + 1) * batch_size, hi)
        pad = batch_size - (z - a)
        yield {"image": np.concatenate([images[a:z], np.zeros((pad, *images.shape[1:]), np.uint8)]),
               "label": np.concatenate([labels[a:z], np.zeros((pad,), np.int32)]),
               "mask": np.arange(batch_size) < z - a}
