"""tf.data input pipelines, one per process: process slices, batches (the sources, what
`data.name` names, are `sources.py`'s; the preprocessing `preprocess.py`'s).

    info(config)                    -> DataInfo(num_classes, num_train, num_eval, image_shape)
    train_iterator(config, batch_size=..., seed=..., start_step=0, process_index=0, process_count=1)
    eval_iterator(config, batch_size=..., process_index=..., process_count=...)

Train. Each process reads its own contiguous slice of the split (the slices differ in size by at
most one and cover the split) and repeats it: the example at position p of the process's stream
is example p % n of epoch p // n, where n is the slice size. The order within an epoch is a
seeded shuffle drawn afresh each epoch, and the crop and flip of position p are keyed by
(seed, process, p), so the stream depends only on (seed, process_index, process_count), not on
tf.data's parallelism. Starting at step k starts at position k * batch_size without decoding
anything before it: sources held as an index of records (image folders, digits, fake, and TFDS
splits smaller than `data.in_memory_bytes`) permute indices (`index_shuffle`), so a start at any
step costs nothing. Larger TFDS splits (ImageNet) are streamed from their TFRecord files in
chunks: the slice is cut, in file order, into chunks of at most `shuffle_buffer // 2` records,
whole files where they fit; each epoch visits the chunks in a seeded order and serves each chunk
whole, in a seeded order of its own, while the next chunk is read: about `shuffle_buffer`
undecoded records are held, the chunk served and the one read ahead. A start reads only the
chunk that holds its position (plus, when a file was cut, the records before it in its first
file), however far into the epoch it is.
The chunks follow the files, so the stream of a streamed split is fixed by the files as written.

Images that do not decode (an empty or truncated file, text named .jpg, a JPEG too large for
TensorFlow's decoder) are named in the log the first time each is met: an image folder's file by
its path, a TFDS record by its key (`FILE__INDEX`, TFDS's `tfds_id`). In training they are then
dropped and counted (`iterator.num_skipped`): a corrupt file never stops a run. A drop shifts the
rest of the stream by one example, so exact restarts hold on data sets without undecodable files.

Eval. One pass, in order; the last batch is padded and `mask` is False on padding. Every process
yields the same number of batches, enough for the largest slice, so multi-host eval steps stay in
lockstep; over all processes each example is unmasked exactly once. An eval image that does not
decode is an error, not a drop: the pass yields all its batches, then raises `BadImageError`
naming every such image of the process's slice (one line), because an eval that counted fewer
examples than its split holds would report on another split. (The eval images are not read at
set-up: that would be a whole eval pass at every start.)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
from absl import logging

from resnet_jax.data import preprocess, sources

try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
except ModuleNotFoundError as error:
    # Importable without them: data.on_device=True reads digits and image folders through
    # on_device.py. Everything here needs them.
    if error.name not in ("tensorflow", "tensorflow_datasets"):
        raise
    tf = tfds = None

if tf is not None:
    try:  # TensorFlow only feeds the host; the accelerators belong to JAX.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices; nothing to take back.
        pass

SHUFFLE_BUFFER = 16_384
IN_MEMORY_BYTES = 2**30
READ_FILES = 16  # TFRecord files a streamed chunk reads at once (TFDS's default)
READ_BUFFER_BYTES = 8 << 20  # read buffer per TFRecord file (TFDS's)


# ---- sources: records in a fixed order, undecoded ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Table:
    """The splits of a source held as an index (digits, image folders, fake): row i of split S
    is `lookup[S](i)` in the graph.

    kind: what lookup returns: "bytes" (an encoded image), "path" (an image file's path, read in
    the parallel map) or "pixels" (uint8 HxWx3).
    """

    kind: str
    lookup: dict  # split name -> fn(int64 row) -> (record, int64 label)
    # What log lines call a row: fn(split name, row) -> its file's path, say.
    name: Callable[[str, int], str] = lambda split, row: f"row {row} of split {split!r}"


class _Slice(NamedTuple):
    """One process's slice of a split, as `_Source.records` gives it."""

    kind: str  # of the records: "bytes", "path" or "pixels" (`_Table`)
    n: int  # records
    lookup: Callable | None  # fn(int64 i) -> (record, int64 label) where held as an index
    subsplit: str | None  # else the TFDS sub-split to stream
    names: Callable[[list[int]], list[str]]  # what log lines call records i of the slice


def _indexed(records, labels) -> Callable:
    records_t, labels_t = tf.constant(records), tf.constant(labels, tf.int64)
    return lambda i: (tf.gather(records_t, i), tf.gather(labels_t, i))


@functools.lru_cache(maxsize=None)
def _digits_table(image_size: int) -> _Table:
    return _Table("pixels", {k: _indexed(*v) for k, v in sources.digits(image_size).items()})


def _fake_table(image_size: int, num_classes: int) -> _Table:
    """Random uint8 images made in the graph from the row number; label = row % num_classes."""

    def lookup(split_id):
        def fn(i):
            key = tf.stack([tf.constant(split_id, tf.int64), tf.cast(i, tf.int64)])
            image = tf.random.stateless_uniform((image_size, image_size, 3), seed=key,
                                                maxval=256, dtype=tf.int32)
            return tf.cast(image, tf.uint8), tf.cast(i, tf.int64) % num_classes
        return fn

    return _Table("pixels", {"train": lookup(0), "validation": lookup(1), "test": lookup(1)})


@functools.lru_cache(maxsize=None)
def _folder_table(root: str) -> _Table:
    files = sources.folder(root)[1]
    paths = {k: [path for path, _ in v] for k, v in files.items()}
    return _Table("path", {k: _indexed(paths[k], [label for _, label in v])
                           for k, v in files.items()},
                  name=lambda split, row: paths[split][row])


@dataclasses.dataclass(frozen=True)
class _Source(sources.Source):
    """`sources.Source` with the records of one process's slice, for tf.data."""

    @functools.cached_property
    def table(self) -> _Table | None:
        if self.name == "fake":
            return _fake_table(self.image_size, self.num_classes)
        if self.name == "digits":
            return _digits_table(self.image_size)
        if self.is_folder:
            return _folder_table(self.root)
        return None

    def slice_sizes(self, split: str, process_count: int) -> list[int]:
        if self.table is not None:
            n = self.size(split)
            return [b - a for a, b in zip(*sources.process_slices(n, process_count))]
        return [self.builder.info.splits[s].num_examples
                for s in tfds.even_splits(split, n=process_count)]

    def records(self, split: str, process_index: int, process_count: int,
                index: bool = True) -> _Slice:
        """One process's slice (`_Slice`): a lookup when the slice is held as an index;
        otherwise the sub-split to stream (`in_order`, `chunks`). index=False streams a TFDS
        split however small (eval reads in order, once)."""
        if self.table is not None:
            return self._table_records(split, process_index, process_count)
        subsplit = tfds.even_splits(split, n=process_count)[process_index]
        info = self.builder.info.splits[subsplit]
        kind, n = self._tfds_kind, info.num_examples
        limit = int(sources.get(self.config, "in_memory_bytes", IN_MEMORY_BYTES))
        if index and info.num_bytes and info.num_bytes <= limit:
            # Small enough to hold undecoded: index it, for exact shuffles and free restarts.
            records, labels, keys = [], [], []
            for record, label, key in self.in_order(subsplit, keys=True).batch(
                    4096).as_numpy_iterator():
                records.extend(record)
                labels.extend(label)
                keys.extend(key)
            records_t = tf.constant(np.stack(records) if kind == "pixels" else records)
            labels_t = tf.constant(labels, tf.int64)
            return _Slice(kind, n, lambda i: (tf.gather(records_t, i), tf.gather(labels_t, i)),
                          None, lambda rows: [keys[i].decode() for i in rows])
        return _Slice(kind, n, None, subsplit, functools.partial(self._keys, subsplit))

    def _keys(self, subsplit, rows: list[int]) -> list[str]:
        """The TFDS keys of records `rows` of `in_order(subsplit)`. Read again, up to the last of
        them: only an error path needs them, and TFDS's own ids are the ones to trust."""
        wanted, found = set(rows), {}
        keys = self.in_order(subsplit, keys=True).map(_plain(lambda record, label, key: key))
        for row, key in enumerate(keys.take(max(rows, default=-1) + 1).as_numpy_iterator()):
            if row in wanted:
                found[row] = key.decode()
        return [found[row] for row in rows]

    @functools.cached_property
    def _tfds_kind(self) -> str:
        image_key = self.tfds_keys[0]
        encoded = isinstance(self.builder.info.features[image_key], tfds.features.Image)
        return "bytes" if encoded else "pixels"

    def _tfds_decoders(self):
        # Encoded images stay bytes here: the parallel map decodes them (and skips bad ones).
        image_key = self.tfds_keys[0]
        return {image_key: tfds.decode.SkipDecoding()} if self._tfds_kind == "bytes" else None

    def in_order(self, subsplit, keys: bool = False) -> tf.data.Dataset:
        """(record, int64 label) of a TFDS sub-split, in the order TFDS reads it; keys=True adds
        each record's key (TFDS's `tfds_id`, FILE__INDEX) third."""
        image_key, label_key = self.tfds_keys
        ds = self.builder.as_dataset(split=subsplit, shuffle_files=False,
                                     decoders=self._tfds_decoders(),
                                     read_config=tfds.ReadConfig(add_tfds_id=keys))
        return ds.map(_plain(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int64))
                             + ((ex["tfds_id"],) if keys else ())))

    def parse(self, serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(record, int64 label) of one serialized TFDS example, as `in_order` gives it."""
        image_key, label_key = self.tfds_keys
        ex = self.builder.info.features.deserialize_example(serialized,
                                                            decoders=self._tfds_decoders())
        return ex[image_key], tf.cast(ex[label_key], tf.int64)

    def chunks(self, subsplit, size: int) -> _Chunks:
        """A TFDS sub-split cut into chunks of at most `size` records (see `_cut`)."""
        file_format = self.builder.info.file_format
        if file_format not in (None, tfds.core.FileFormat.TFRECORD):
            raise ValueError(f"data.name={self.name!r} is stored as {file_format.value} files; "
                             f"streaming a split larger than data.in_memory_bytes reads TFRecord "
                             f"files only")
        pieces = [(os.fspath(f.filename), f.skip,
                   f.examples_in_shard - f.skip if f.take < 0 else f.take)
                  for f in self.builder.info.splits[subsplit].file_instructions]
        chunks = _cut(pieces, size)
        flat = [piece for chunk in chunks for piece in chunk]
        reread = sum(skip for _, skip, _ in flat) - sum(skip for _, skip, _ in pieces)
        if reread:
            logging.info("Train stream: files of more than %d records are cut into chunks; %d "
                         "records an epoch are read only to be skipped (a larger "
                         "data.shuffle_buffer keeps files whole)", size, reread)
        return _Chunks(
            sizes=np.array([sum(take for _, _, take in chunk) for chunk in chunks], np.int64),
            firsts=np.cumsum([0] + [len(chunk) for chunk in chunks]).astype(np.int64),
            files=np.array([file for file, _, _ in flat]),
            skips=np.array([skip for _, skip, _ in flat], np.int64),
            takes=np.array([take for _, _, take in flat], np.int64))

    def _table_records(self, split, process_index, process_count):
        table = self.table
        ranges = self.rows(split)
        total = sum(end - start for _, start, end in ranges)
        starts, ends = sources.process_slices(total, process_count)
        lo, hi = starts[process_index], ends[process_index]
        # Rows lo..hi of the concatenated ranges, as (split name, row) pieces.
        pieces, offset = [], 0
        for name, start, end in ranges:
            a, b = max(lo - offset, 0), min(hi - offset, end - start)
            if a < b:
                pieces.append((name, start + a, start + b))
            offset += end - start
        starts = np.cumsum([0] + [b - a for _, a, b in pieces])[:-1]

        def names(rows):  # the table's names of rows of the slice
            out = []
            for i in rows:
                (name, start, _), first = _piece_of(pieces, starts, i)
                out.append(table.name(name, start + i - first))
            return out

        if len(pieces) == 1:
            name, start, _ = pieces[0]
            fn = table.lookup[name]
            return _Slice(table.kind, hi - lo, lambda i: fn(start + i), None, names)
        # Several splits: look up in the piece that holds row i.
        firsts = tf.constant(starts, tf.int64)

        def lookup(i):
            piece = tf.cast(tf.reduce_sum(tf.cast(firsts <= i, tf.int32)) - 1, tf.int32)
            branches = [functools.partial(_piece_lookup, table.lookup[name], start, first, i)
                        for (name, start, _), first in zip(pieces, starts)]
            return tf.switch_case(piece, branches)

        return _Slice(table.kind, hi - lo, lookup, None, names)


def _piece_of(pieces, starts, i):
    """(piece, its first row in the slice) of the piece that holds row i of the slice."""
    k = int(np.searchsorted(starts, i, side="right")) - 1
    return pieces[k], int(starts[k])


def _piece_lookup(fn, start, first, i):
    return fn(start + i - first)


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """A streamed slice cut into chunks: chunk c is the records of pieces firsts[c] to
    firsts[c + 1] - 1, piece k being records skips[k] to skips[k] + takes[k] - 1 of files[k]."""

    sizes: np.ndarray  # records in each chunk
    firsts: np.ndarray  # one more than chunks
    files: np.ndarray
    skips: np.ndarray
    takes: np.ndarray


def _cut(pieces: list[tuple[str, int, int]], size: int) -> list[list[tuple[str, int, int]]]:
    """Consecutive (file, skip, take) pieces grouped, in order, into chunks of at most `size`
    records. A file that fits in a chunk is kept whole: a chunk that starts inside a file reads
    it from its start, TFRecord files having no index. A larger file is cut."""
    chunks, current, count = [], [], 0
    for file, skip, take in pieces:
        if current and count + take > size:
            chunks.append(current)
            current, count = [], 0
        while take > size:
            chunks.append([(file, skip, size)])
            skip, take = skip + size, take - size
        if take:
            current.append((file, skip, take))
            count += take
    if current:
        chunks.append(current)
    return chunks


# ---- checks shared by the entry points --------------------------------------------------------


def _open(config) -> tuple[_Source, preprocess.Settings]:
    s = preprocess.settings(config)
    source = _Source(config)
    source.check_num_classes()
    return source, s


def _check_processes(batch_size, process_index, process_count):
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")


def info(config) -> sources.DataInfo:
    """The data's sizes, with every check that needs no image read (`sources.Source.info`)."""
    preprocess.settings(config)
    return _Source(config).info()


# What the mean image depends on: its file name in the workdir is made from them (`pixel_mean_file`).
PIXEL_MEAN_FIELDS = ("name", "data_dir", "train_split", "image_size", "resize_method", "antialias",
                     "fake_num_train")
_PIXEL_MEANS: dict[tuple, np.ndarray] = {}  # per process: the mean images made or read so far


def _mean_key(config) -> tuple:
    return tuple((f, _hashable(sources.get(config, f))) for f in PIXEL_MEAN_FIELDS)


def pixel_mean_sums(config, process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, int]:
    """The sum (float64) and count of this process's slice of the training images, each resized
    whole to image_size x image_size (`preprocess.mean_image_fn`): the per-pixel mean of
    Sec. 3.4 and 4.2 is the sum over every slice divided by the count over every slice."""
    source, s = _open(_FrozenConfig(dict(_mean_key(config))))
    kind, n, lookup, subsplit, _ = source.records(source.split(train=True), process_index,
                                                  process_count)
    ds = source.in_order(subsplit) if lookup is None else tf.data.Dataset.range(n).map(_plain(lookup))
    fn = preprocess.mean_image_fn(s, kind)
    ds = ds.map(_plain(lambda record, label: fn(record)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=False).batch(256).prefetch(tf.data.AUTOTUNE)
    total, count = np.zeros((s.image_size, s.image_size, 3), np.float64), 0
    for batch in ds.as_numpy_iterator():
        total += batch.sum(axis=0, dtype=np.float64)
        count += len(batch)
    return total, count


def pixel_mean_file(config) -> str:
    """The mean image's file name, `pixel_mean_<digest>.npy`, the digest of `PIXEL_MEAN_FIELDS`:
    another data set, split or size gets another file."""
    digest = hashlib.sha256(json.dumps(_mean_key(config)).encode()).hexdigest()[:12]
    return f"pixel_mean_{digest}.npy"


def use_pixel_mean(config, mean: np.ndarray) -> None:
    """`pixel_mean(config)` returns `mean` from now on (in this process): the run's mean image,
    made once and the same on every process (`pixel_mean.load`)."""
    _PIXEL_MEANS[_mean_key(config)] = np.asarray(mean, np.float32)


class _FrozenConfig(dict):
    def get(self, name, default=None):
        value = super().get(name, default)
        return default if value is None else value


def pixel_mean(config) -> np.ndarray | None:
    """The per-pixel mean image of the training split (Sec. 3.4, 4.2), image_size square, float32;
    None unless `data.subtract_pixel_mean`. The one `use_pixel_mean` gave, else computed here from
    the whole split once per process (the CIFAR recipe's 50k small images take seconds)."""
    if not sources.get(config, "subtract_pixel_mean", False):
        return None
    key = _mean_key(config)
    if key not in _PIXEL_MEANS:
        total, count = pixel_mean_sums(config)
        logging.info("Per-pixel mean image of %s computed from %d training images",
                     sources.get(config, "name"), count)
        _PIXEL_MEANS[key] = (total / max(count, 1)).astype(np.float32)
    return _PIXEL_MEANS[key]


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


# ---- iterators -----------------------------------------------------------------------------------


class _BadImages:
    """The images of a stream that did not decode: each named in the log the first time it is
    met, all counted; an eval pass that met any ends with `BadImageError` (`check_pass`)."""

    SHOWN = 5  # names in an error's one line; the log has them all

    def __init__(self, what: str, names: Callable[[list[int]], list[str]], evaluating: bool):
        self._what, self._names, self._evaluating = what, names, evaluating
        self.count = 0  # skips, a file met in each of two epochs counting twice
        self._named: set[str] = set()
        self._in_pass: list[str] = []  # eval: the names for `check_pass`

    def skip(self, positions: list[int]) -> None:
        """The records at these stream positions did not decode."""
        if not positions:
            return
        self.count += len(positions)
        names = self._names(positions)
        if self._evaluating:
            self._in_pass.extend(names)
        new = [name for name in dict.fromkeys(names) if name not in self._named]
        self._named.update(new)
        if new:
            then = "the eval stops after this pass" if self._evaluating else "skipped"
            logging.warning("%s: %d image%s that do%s not decode, %s (%d so far): %s",
                            self._what, len(new), "s" * (len(new) > 1), "es" * (len(new) == 1),
                            then, self.count, ", ".join(new))

    def check_pass(self) -> None:
        """Eval: an image that did not decode is an error (each example counts once)."""
        if not self._in_pass:
            return
        k, shown = len(self._in_pass), ", ".join(self._in_pass[:self.SHOWN])
        more = f" and {k - self.SHOWN} more (the log names them all)" if k > self.SHOWN else ""
        raise sources.BadImageError(
            f"{self._what}: {k} image{'s' * (k > 1)} that do{'es' * (k == 1)} not decode: "
            f"{shown}{more}; an eval counts every example of its split, so replace or remove "
            f"{'it' if k == 1 else 'them'}")


class Batches(Iterator):
    """Numpy batches of a tf.data pipeline; names and counts the images that failed to decode
    (`_BadImages`). Eval (`num_batches` given): after its last batch, raises `BadImageError`
    instead of StopIteration where any did."""

    def __init__(self, ds: tf.data.Dataset, names: Callable[[list[int]], list[str]], *,
                 start: int, end: int | None = None, batch_size: int,
                 num_batches: int | None = None, what: str, image_shape: tuple[int, ...] = (),
                 dtype=np.float32):
        self._image_shape, self._dtype = image_shape, dtype
        self._iterator = ds.as_numpy_iterator()
        self._next = start  # the stream position the next image should have
        self._end = end  # eval: one past the last position
        self._batch_size = batch_size
        self._left = num_batches
        self._bad = _BadImages(what, names, evaluating=num_batches is not None)

    @property
    def num_skipped(self) -> int:
        return self._bad.count

    def _count(self, positions):
        if len(positions):
            self._skip_to(int(positions[-1]) + 1, positions)

    def _skip_to(self, end: int, present=()):
        """The positions from the next expected one to `end` that are not `present` were
        dropped: they did not decode."""
        if end - self._next > len(present):  # else none was: the common case, at no cost
            self._bad.skip(np.setdiff1d(np.arange(self._next, end), present).tolist())
        self._next = max(self._next, end)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._left is None:  # train: infinite
            batch = next(self._iterator)
            self._count(batch.pop("position"))
            return batch
        if self._left <= 0:
            self._bad.check_pass()
            raise StopIteration
        self._left -= 1
        batch = next(self._iterator, None)
        if batch is None:  # eval: padding batches so that every process yields as many
            if self._end is not None:
                self._skip_to(self._end)
            batch = {"image": np.zeros((0, *self._image_shape), self._dtype),
                     "label": np.zeros((0,), np.int32), "position": np.zeros((0,), np.int64)}
        self._count(batch.pop("position"))
        real = len(batch["label"])
        pad = self._batch_size - real
        batch["mask"] = np.arange(self._batch_size) < real
        if pad:
            batch["image"] = np.concatenate(
                [batch["image"], np.zeros((pad, *batch["image"].shape[1:]), batch["image"].dtype)])
            batch["label"] = np.concatenate([batch["label"], np.zeros((pad,), np.int32)])
        if self._left == 0 and self._end is not None:
            self._skip_to(self._end)
        return batch


def _plain(fn: Callable) -> Callable:
    """`fn` for tf.data's map as it is written: the pipeline's functions are plain graph code (no
    Python control flow on tensors), and autograph's conversion of them was most of the
    pipeline's set-up time."""
    return tf.autograph.experimental.do_not_convert(fn)


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = True
    options.experimental_optimization.map_parallelization = True
    # One thread per op: the parallelism is across examples (as the Flax ImageNet example).
    options.threading.max_intra_op_parallelism = 1
    return options


def _stream_key(seed: int, process_index: int) -> tf.Tensor:
    return tf.constant([seed, process_index], tf.int64)


def _epoch_key(key, epoch) -> tf.Tensor:
    """The key of an epoch's order: of its permutation of the records (held as an index) or of
    its chunks and their records (streamed)."""
    return preprocess.fold(preprocess.fold(key, 0), epoch)


def _chunk_order(key, epoch, num_chunks: int) -> tf.Tensor:
    """The chunks in the order epoch `epoch` visits them: a seeded permutation."""
    return tf.random.experimental.index_shuffle(
        tf.range(num_chunks, dtype=tf.int64), preprocess.fold(_epoch_key(key, epoch), 0),
        num_chunks - 1)


def _streamed(chunks: _Chunks, key, first: int, where: bool = False) -> tf.data.Dataset:
    """Serialized records from stream position `first` on. Each epoch visits the chunks in a
    seeded order and serves each one whole, fully shuffled with a seed of its own; the next chunk
    is read while one is served. Reads nothing of the epoch before the chunk that holds `first`.

    where=True: instead of each record, where it is, (piece, index in its file), in the same
    order, reading no file: a shuffle's order depends on its seed and the number of elements,
    not on what they hold."""
    num_chunks, n = len(chunks.sizes), int(chunks.sizes.sum())
    epoch, offset = divmod(first, n)
    # Where `first` falls: the visit (slot) of its epoch and how far into that chunk.
    ends = np.cumsum(chunks.sizes[_chunk_order(key, epoch, num_chunks).numpy()])
    slot = int(np.searchsorted(ends, offset, side="right"))
    skip = offset - (int(ends[slot - 1]) if slot else 0)

    firsts = tf.constant(chunks.firsts)
    files, skips, takes = (tf.constant(chunks.files), tf.constant(chunks.skips),
                           tf.constant(chunks.takes))
    largest = int(chunks.sizes.max())

    @_plain
    def visits(epoch):
        order = tf.data.Dataset.from_tensor_slices(_chunk_order(key, epoch, num_chunks))
        return order.map(lambda chunk: (epoch, chunk))

    @_plain
    def read_piece(k):
        if where:
            return tf.data.Dataset.range(skips[k], skips[k] + takes[k]).map(lambda i: (k, i))
        records = tf.data.TFRecordDataset(files[k], buffer_size=READ_BUFFER_BYTES)
        return records.skip(skips[k]).take(takes[k])

    @_plain
    def read(epoch, chunk):  # one element: all the chunk's records, in the order served
        pieces = tf.data.Dataset.range(firsts[chunk], firsts[chunk + 1])
        # Files read in parallel; a fixed cycle length keeps the order the same on any machine.
        records = pieces.interleave(read_piece, cycle_length=READ_FILES, block_length=1,
                                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        seed = tf.random.stateless_uniform(
            (), seed=preprocess.fold(preprocess.fold(_epoch_key(key, epoch), 1), chunk),
            dtype=tf.int64, minval=None, maxval=None)
        # A buffer as large as the chunk: a uniform shuffle of all of it. Records are moved, not
        # copied, from the files through the shuffle and batch to unbatch.
        return records.shuffle(largest, seed=seed).batch(largest)

    ds = tf.data.Dataset.range(epoch, 2**62).flat_map(visits).skip(slot).flat_map(read)
    # prefetch(1): one chunk read ahead while one is served, no more.
    return ds.prefetch(1).unbatch().skip(skip)


def _train_records(config, seed: int, first: int, process_index: int, process_count: int):
    """(dataset of (position, record, label) from stream position `first` on, the records' kind,
    fn(positions) -> what log lines call the records there) of this process's train stream."""
    source, _ = _open(config)
    kind, n, lookup, subsplit, names = source.records(source.split(train=True), process_index,
                                                      process_count)
    if n == 0:
        raise ValueError(f"process {process_index} of {process_count} has no training examples")
    key = _stream_key(seed, process_index)
    if lookup is not None:
        def row(position):
            epoch, i = position // n, position % n
            return tf.random.experimental.index_shuffle(i, _epoch_key(key, epoch), n - 1)

        def fetch(position):
            return position, *lookup(row(position))

        def stream_names(positions):
            return names([int(row(tf.constant(p, tf.int64))) for p in positions])

        return tf.data.Dataset.counter(start=first).map(_plain(fetch)), kind, stream_names
    buffer = sources.get(config, "shuffle_buffer", SHUFFLE_BUFFER)
    if isinstance(buffer, bool) or not isinstance(buffer, (int, np.integer)) or buffer < 1:
        raise ValueError(f"data.shuffle_buffer={buffer!r} must be a positive number of records")
    # Chunks of half the buffer: the one served and the one read ahead hold at most it.
    chunks = source.chunks(subsplit, max(buffer // 2, 1))
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start=first), _streamed(chunks, key, first))
    ds = ds.map(_plain(lambda position, serialized: (position, *source.parse(serialized))),
                num_parallel_calls=tf.data.AUTOTUNE)

    def stream_names(positions):  # TFDS's key of each record: FILE__INDEX
        out = []
        for position in positions:
            piece, index = next(_streamed(chunks, key, position, where=True).as_numpy_iterator())
            out.append(f"{os.path.basename(chunks.files[piece])}__{index}")
        return out

    return ds, kind, stream_names


def train_dataset(config, *, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """The tf.data pipeline of `train_iterator`, with a "position" entry in each batch."""
    return _train_pipeline(config, batch_size, seed, start_step, process_index, process_count)[0]


def _train_pipeline(config, batch_size, seed, start_step, process_index, process_count):
    """(`train_dataset`, fn(stream positions) -> what log lines call the records there)."""
    _check_processes(batch_size, process_index, process_count)
    ds, kind, names = _train_records(config, seed, start_step * batch_size, process_index,
                                     process_count)
    s = preprocess.settings(config)
    key = _stream_key(seed, process_index)
    fn = preprocess.train_fn(s, kind, pixel_mean(config))

    def prepare(position, record, label):
        example_key = preprocess.fold(preprocess.fold(key, 1), position)
        out = {"image": fn(record, example_key), "label": tf.cast(label, tf.int32),
               "position": position}
        if s.lighting and s.on_device:  # added on the devices, before normalising
            out["lighting"] = preprocess.lighting_offset(s, example_key)
        return out

    ds = ds.map(_plain(prepare), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=False)  # `Batches` names and counts what it drops
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(deterministic=True)), names


def train_iterator(config, *, batch_size: int, seed: int, start_step: int = 0,
                   process_index: int = 0, process_count: int = 1) -> Batches:
    """Infinite {"image": (batch_size, H, W, C), "label": (batch_size,) int32} batches of this
    process (batch_size is per process); the same for the same (seed, process_index,
    process_count), and from `start_step` on the same as an iterator started at 0."""
    ds, names = _train_pipeline(config, batch_size, seed, start_step, process_index,
                                process_count)
    return Batches(ds, names, start=start_step * batch_size, batch_size=batch_size,
                   what=f"train data {sources.get(config, 'name')}")


def _eval_records(source: _Source, process_index: int, process_count: int):
    """(this process's slice of the eval split (`_Slice`), its dataset of (position, record,
    label) in order)."""
    part = source.records(source.split(train=False), process_index, process_count, index=False)
    if part.lookup is not None:
        return part, tf.data.Dataset.range(part.n).map(_plain(lambda i: (i, *part.lookup(i))))
    return part, tf.data.Dataset.zip(tf.data.Dataset.counter(), source.in_order(
        part.subsplit)).map(_plain(lambda position, example: (position, *example)))


def eval_dataset(config, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                 repeat: bool = False) -> tf.data.Dataset:
    """The unpadded tf.data pipeline of `eval_iterator` (repeat=True for benchmarks)."""
    return _eval_pipeline(config, batch_size, process_index, process_count, repeat)[0]


def _eval_pipeline(config, batch_size, process_index, process_count, repeat=False):
    """(`eval_dataset`, fn(positions) -> what log lines call the records there)."""
    _check_processes(batch_size, process_index, process_count)
    source, s = _open(config)
    part, ds = _eval_records(source, process_index, process_count)
    kind = part.kind
    fn = preprocess.eval_fn(s, kind, pixel_mean(config))

    def prepare(position, record, label):
        return {"image": fn(record), "label": tf.cast(label, tf.int32), "position": position}

    if repeat:
        ds = ds.repeat()
    ds = ds.map(_plain(prepare), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=False)  # `Batches` names them and raises BadImageError
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(deterministic=True)), part.names


def eval_iterator(config, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> Batches:
    """One pass over this process's slice of the eval split: {"image", "label", "mask"} with the
    last batch padded (mask False); every process yields the same number of batches. Then, where
    images of the slice did not decode, raises `BadImageError` naming them."""
    source, s = _open(config)
    split = source.split(train=False)
    sizes = source.slice_sizes(split, process_count)
    num_batches = -(-max(sizes) // batch_size) if sizes else 0
    ds, names = _eval_pipeline(config, batch_size, process_index, process_count)
    return Batches(ds, names, start=0, end=sizes[process_index], batch_size=batch_size,
                   num_batches=num_batches,
                   what=f"eval data {sources.get(config, 'name')} (data.eval_split={split!r})",
                   image_shape=preprocess.output_shape(s, train=False),
                   dtype=s.tf_dtype.as_numpy_dtype)


def multi_scale_iterator(config, *, batch_sizes, process_index: int = 0,
                         process_count: int = 1) -> Iterator[dict]:
    """One pass over this process's slice of the eval split for multi-scale testing (Sec. 3.4,
    `preprocess.multi_scale_fn`): batches of images of one shape class, `batch_sizes[aspect +
    MAX_ASPECT_STEP]` of them (`preprocess.multi_scale_batch_sizes`), {"aspect": the class,
    "views": one (batch, h, w, 3) array per scale, "label", "mask"}, each class's last batch
    padded (mask False). Batches come by class, not in the split's order; every image of the
    slice is in exactly one batch. Processes yield different numbers of batches (their classes
    fill differently), so the steps run on each process's own devices (`evaluation.evaluate`).

    Memory: tf.data holds up to one batch less one image of each of the 25 shape classes while
    the class fills, beside the batches in flight.
    """
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if len(batch_sizes) != 2 * preprocess.MAX_ASPECT_STEP + 1:
        raise ValueError(f"batch_sizes must give {2 * preprocess.MAX_ASPECT_STEP + 1} sizes, one "
                         f"per shape class; got {len(batch_sizes)}")
    _check_processes(min(batch_sizes), process_index, process_count)
    source, s = _open(config)
    if s.eval_preprocess != "multi_scale":
        raise ValueError(f"multi_scale_iterator needs data.eval_preprocess='multi_scale'; got "
                         f"{s.eval_preprocess!r}")
    part, ds = _eval_records(source, process_index, process_count)
    fn = preprocess.multi_scale_fn(s, part.kind, pixel_mean(config))

    def prepare(position, record, label):
        aspect, views = fn(record)
        return {"aspect": aspect, "views": views, "label": tf.cast(label, tf.int32),
                "position": position}

    ds = ds.map(_plain(prepare), num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=False)
    sizes = tf.constant(batch_sizes, tf.int64)
    ds = ds.group_by_window(
        key_func=lambda example: tf.cast(example["aspect"], tf.int64) + preprocess.MAX_ASPECT_STEP,
        reduce_func=lambda key, window: window.batch(tf.gather(sizes, key)),
        window_size_func=lambda key: tf.gather(sizes, key))
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(deterministic=True))
    seen = np.zeros(part.n, bool)
    for batch in ds.as_numpy_iterator():
        real = len(batch["label"])
        seen[batch["position"]] = True
        batch_size = batch_sizes[int(batch["aspect"][0]) + preprocess.MAX_ASPECT_STEP]
        pad = batch_size - real
        yield {"aspect": int(batch["aspect"][0]),
               "views": tuple(np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                              for v in batch["views"]),
               "label": np.concatenate([batch["label"], np.zeros((pad,), np.int32)]),
               "mask": np.arange(batch_size) < real}
    what = f"eval data {sources.get(config, 'name')} (data.eval_split={source.split(train=False)!r})"
    bad = _BadImages(what, part.names, evaluating=True)
    bad.skip(np.flatnonzero(~seen).tolist())
    bad.check_pass()
