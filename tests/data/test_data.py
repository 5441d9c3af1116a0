"""Input pipelines: sources, process slices, exact eval, determinism, restarts, errors."""

import logging
import os
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax.data import pipeline, preprocess, sources

CLASSES = ("ant", "bee", "cat")


def _config(**fields):
    fields.setdefault("mean", (0.0, 0.0, 0.0))
    fields.setdefault("std", (1.0, 1.0, 1.0))
    return ml_collections.ConfigDict(fields)


def _smooth(h, w, seed):
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (3, 3, 3)).astype(np.float32)
    return tf.cast(tf.image.resize(small, (h, w)), tf.uint8).numpy()


def _save(path, array, fmt="JPEG", mode=None):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, fmt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train: 3 classes x 6 JPEGs of assorted sizes, plus a grey JPEG, a CMYK JPEG and a PNG
    named .JPEG; test: 3 x 3."""
    root = tmp_path_factory.mktemp("folder")
    for split, per_class in (("train", 6), ("test", 3)):
        for c, name in enumerate(CLASSES):
            os.makedirs(root / split / name)
            for i in range(per_class):
                _save(root / split / name / f"{i}.jpg", _smooth(20 + 3 * i, 40 - 2 * i, c * 10 + i))
    _save(root / "train" / "ant" / "grey.jpg", _smooth(30, 20, 1), mode="L")
    _save(root / "train" / "bee" / "cmyk.jpg", _smooth(25, 35, 2), mode="CMYK")
    _save(root / "train" / "cat" / "png.JPEG", _smooth(33, 21, 3), fmt="PNG")
    return root


@pytest.fixture(scope="module")
def ident(tmp_path_factory):
    """PNG squares of one colour each, the colour saying which file it is: 40 train, 25 test."""
    root = tmp_path_factory.mktemp("ident")
    for split, n in (("train", 40), ("test", 25)):
        for i in range(n):
            directory = root / split / CLASSES[i % 3]
            os.makedirs(directory, exist_ok=True)
            _save(directory / f"{i}.png", np.full((4, 4, 3), (i, 7, 9), np.uint8), fmt="PNG")
    return root


def _ids(batch, mask=None):
    ids = batch["image"][:, 0, 0, 0].astype(np.int64)
    return ids if mask is None else ids[mask]


class TinyJpegImages(tfds.core.GeneratorBasedBuilder):
    """A TFDS data set of 24 train and 10 test JPEGs: the TFDS-by-name path on real records."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=3)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24, 0), "test": self._generate_examples(10, 1)}

    def _generate_examples(self, n, seed):
        for i in range(n):
            # Shade i in the top-left corner names the example.
            image = _smooth(20 + i % 5, 30, seed * 100 + i)
            image[:8, :8] = 10 * i
            yield i, {"image": image, "label": i % 3}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    TinyJpegImages(data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def six_files(tmp_path_factory):
    """tiny_jpeg_images written as 6 files of 4 train records (and 6 small test files)."""
    data_dir = str(tmp_path_factory.mktemp("tfds_six_files"))
    TinyJpegImages(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=6))
    return data_dir


def _record_shade(serialized):
    """The example number of a serialized tiny_jpeg_images record."""
    spec = {"image": tf.io.FixedLenFeature([], tf.string)}
    features = tf.io.parse_single_example(serialized, spec)
    return int(np.round(tf.io.decode_jpeg(features["image"])[1, 1].numpy().mean() / 10))


def _file_shades(data_dir):
    """The example numbers in each train file, in file order."""
    info = tfds.builder("tiny_jpeg_images", data_dir=data_dir).info.splits["train"]
    return [[_record_shade(r) for r in tf.data.TFRecordDataset(f.filename).as_numpy_iterator()]
            for f in info.file_instructions]


# ---- sources -----------------------------------------------------------------------------------


def test_info_of_each_source(folder, tiny_tfds):
    assert pipeline.info(_config(name="digits", image_size=16)) == sources.DataInfo(10, 1497, 300,
                                                                                     (16, 16, 3))
    assert pipeline.info(_config(name="fake", image_size=20, num_classes=7, fake_num_train=50,
                                 fake_num_eval=9)) == sources.DataInfo(7, 50, 9, (20, 20, 3))
    assert pipeline.info(_config(name=f"imagefolder:{folder}", image_size=24)) == sources.DataInfo(
        3, 21, 9, (24, 24, 3))
    assert pipeline.info(_config(name="tiny_jpeg_images", data_dir=tiny_tfds, image_size=12,
                                 train_split="train[:20]")) == sources.DataInfo(3, 20, 10, (12, 12, 3))
    config = _config(name=f"imagefolder:{folder}", eval_split="train[:5]+test")
    assert pipeline.info(config).num_eval == 14


SOURCES = {
    "folder": lambda folder, tiny: dict(name=f"imagefolder:{folder}", num_classes=3),
    "digits": lambda folder, tiny: dict(name="digits"),
    "fake": lambda folder, tiny: dict(name="fake", num_classes=5, fake_num_train=40,
                                      fake_num_eval=12),
    "tfds": lambda folder, tiny: dict(name="tiny_jpeg_images", data_dir=tiny),
    "tfds_streamed": lambda folder, tiny: dict(name="tiny_jpeg_images", data_dir=tiny,
                                               in_memory_bytes=0, shuffle_buffer=8),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("preprocessing", ["inception", "paper", "cifar", "none"])
def test_train_batches_of_each_source_and_preprocessing(source, preprocessing, folder, tiny_tfds):
    fields = SOURCES[source](folder, tiny_tfds)
    config = _config(image_size=16, train_preprocess=preprocessing, scale_range=(18, 30),
                     dtype="bfloat16" if source == "fake" else "float32", **fields)
    num_classes = pipeline.info(config).num_classes
    it = pipeline.train_iterator(config, batch_size=5, seed=0)
    for _ in range(2):
        batch = next(it)
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (5, 16, 16, 3)
        assert batch["image"].dtype == (tf.bfloat16.as_numpy_dtype if source == "fake"
                                        else np.float32)
        assert batch["label"].dtype == np.int32
        assert np.all((0 <= batch["label"]) & (batch["label"] < num_classes))
        values = batch["image"].astype(np.float32)
        assert values.min() >= -0.5 and values.max() <= 255.5 and values.std() > 1
    assert it.num_skipped == 0


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("preprocessing", ["center", "ten_crop", "none"])
def test_eval_batches_of_each_source_and_preprocessing(source, preprocessing, folder, tiny_tfds):
    config = _config(image_size=12, eval_preprocess=preprocessing, resize_size=14,
                     **SOURCES[source](folder, tiny_tfds))
    info = pipeline.info(config)
    batches = list(pipeline.eval_iterator(config, batch_size=4))
    assert len(batches) == -(-info.num_eval // 4)
    shape = (4, 10, 12, 12, 3) if preprocessing == "ten_crop" else (4, 12, 12, 3)
    for batch in batches:
        assert set(batch) == {"image", "label", "mask"}
        assert batch["image"].shape == shape and batch["image"].dtype == np.float32
        assert batch["mask"].dtype == bool and batch["label"].dtype == np.int32
        assert np.all((0 <= batch["label"]) & (batch["label"] < info.num_classes))
        assert batch["image"].min() >= -0.5 and batch["image"].max() <= 255.5
    assert sum(int(b["mask"].sum()) for b in batches) == info.num_eval
    assert not batches[-1]["image"][~batches[-1]["mask"]].any()  # padding is zeros


def test_digits_are_the_scikit_learn_digits():
    from sklearn import datasets

    config = _config(name="digits", image_size=8, eval_preprocess="none")
    images, labels = [], []
    for batch in pipeline.eval_iterator(config, batch_size=100):
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape == (300, 8, 8, 3) and np.all(images[..., 0] == images[..., 2])
    assert images.max() == 255 and images.min() == 0
    digits = datasets.load_digits()
    # Every test image is one of the real digits, with its label; all classes are in the test set.
    reference = {np.round(img * 255 / 16).astype(np.uint8).tobytes(): t
                 for img, t in zip(digits.images, digits.target)}
    for image, label in zip(images, labels):
        assert reference[image[..., 0].astype(np.uint8).tobytes()] == label
    assert np.bincount(labels, minlength=10).min() >= 25


def test_odd_files_decode_and_nothing_is_skipped(folder):
    config = _config(name=f"imagefolder:{folder}", image_size=8, eval_split="train",
                     eval_preprocess="none")
    it = pipeline.eval_iterator(config, batch_size=32)
    batch = next(it)
    assert int(batch["mask"].sum()) == 21 and it.num_skipped == 0


# ---- determinism, slices, restarts -------------------------------------------------------------


def _take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("source", ["folder", "fake", "tfds_streamed", "tfds"])
def test_same_seed_same_batches(source, folder, tiny_tfds):
    config = _config(image_size=12, train_preprocess="inception",
                     **SOURCES[source](folder, tiny_tfds))
    a = _take(pipeline.train_iterator(config, batch_size=4, seed=3), 8)
    b = _take(pipeline.train_iterator(config, batch_size=4, seed=3), 8)
    c = _take(pipeline.train_iterator(config, batch_size=4, seed=4), 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_each_epoch_is_a_fresh_permutation(ident):
    config = _config(name=f"imagefolder:{ident}", image_size=4, train_preprocess="none")
    it = pipeline.train_iterator(config, batch_size=40, seed=0)
    epochs = [_ids(next(it)) for _ in range(3)]
    for ids in epochs:
        assert sorted(ids) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_crops_are_drawn_afresh_for_each_example_and_epoch():
    # fake labels are the example number here: compare each image with itself an epoch later.
    config = _config(name="fake", image_size=16, num_classes=10, fake_num_train=4,
                     train_preprocess="inception")
    it = pipeline.train_iterator(config, batch_size=4, seed=0)
    epochs = []
    for _ in range(2):
        batch = next(it)
        epochs.append(batch["image"][np.argsort(batch["label"])])
    assert sorted(batch["label"]) == [0, 1, 2, 3]
    for a, b in zip(*epochs):
        assert not np.array_equal(a, b)


@pytest.mark.parametrize("processes", [2, 3])
def test_process_slices_are_disjoint_and_cover_the_split(ident, processes):
    config = _config(name=f"imagefolder:{ident}", image_size=4, train_preprocess="none")
    sizes = [40 * (k + 1) // processes - 40 * k // processes for k in range(processes)]
    seen = []
    for k in range(processes):
        it = pipeline.train_iterator(config, batch_size=sizes[k], seed=0, process_index=k,
                                     process_count=processes)
        first, second = _ids(next(it)), _ids(next(it))
        assert sorted(first) == sorted(second)  # each process repeats its own slice
        seen.append(set(first))
    assert sum(len(s) for s in seen) == 40 and set().union(*seen) == set(range(40))


def _shades(batch, mask=None):
    """The example numbers of tiny_jpeg_images: the shade of the top-left corner over 10."""
    images = batch["image"] if mask is None else batch["image"][mask]
    return np.round(images[:, 1, 1].mean(-1) / 10).astype(int).tolist()


@pytest.mark.parametrize("in_memory_bytes", [0, 2**30])
def test_process_slices_of_tfds_are_disjoint_and_cover(tiny_tfds, in_memory_bytes):
    config = _config(name="tiny_jpeg_images", data_dir=tiny_tfds, image_size=20,
                     train_preprocess="none", in_memory_bytes=in_memory_bytes)
    seen = []
    for k in range(2):
        it = pipeline.train_iterator(config, batch_size=12, seed=0, process_index=k, process_count=2)
        first, second = _shades(next(it)), _shades(next(it))
        assert sorted(first) == sorted(second) and len(set(first)) == 12
        seen.append(set(first))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


@pytest.mark.parametrize("source", ["folder", "fake", "tfds", "tfds_streamed"])
@pytest.mark.parametrize("start_step", [1, 5, 13])
def test_start_at_step_equals_running_from_zero(source, start_step, folder, tiny_tfds):
    # batch 5 over 21, 40 or 24 examples: the starts fall inside the first, second and third epoch
    config = _config(image_size=10, train_preprocess="inception",
                     **SOURCES[source](folder, tiny_tfds))
    from_zero = _take(pipeline.train_iterator(config, batch_size=5, seed=1), start_step + 3)
    restarted = _take(pipeline.train_iterator(config, batch_size=5, seed=1, start_step=start_step), 3)
    for x, y in zip(from_zero[start_step:], restarted):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_start_far_ahead_does_not_read_the_skipped_data():
    config = _config(name="fake", image_size=8, fake_num_train=1000, num_classes=10)
    start = time.perf_counter()
    batch = next(pipeline.train_iterator(config, batch_size=64, seed=0, start_step=10**9))
    assert batch["image"].shape == (64, 8, 8, 3) and time.perf_counter() - start < 20


# ---- streamed TFDS splits: chunks, exact restarts, reading only what a start needs --------------


def _streamed(data_dir, shuffle_buffer, **fields):
    return _config(name="tiny_jpeg_images", data_dir=data_dir, image_size=20,
                   train_preprocess="none", in_memory_bytes=0, shuffle_buffer=shuffle_buffer,
                   **fields)


def _stream(config, start, count, process_index=0, process_count=1):
    """The example numbers at stream positions start .. start + count - 1."""
    it = pipeline.train_iterator(config, batch_size=1, seed=5, start_step=start,
                                 process_index=process_index, process_count=process_count)
    return [_shades(next(it))[0] for _ in range(count)]


@pytest.fixture()
def reads(monkeypatch):
    """The example number of every record read from a TFRecord file, in the order read (TFDS
    reads its files with tf.data.TFRecordDataset too)."""
    log = []
    real = tf.data.TFRecordDataset

    def note(record):
        log.append(_record_shade(record))
        return record

    def logged(*args, **kwargs):
        return real(*args, **kwargs).map(
            lambda r: tf.ensure_shape(tf.py_function(note, [r], tf.string), []))

    monkeypatch.setattr(tf.data, "TFRecordDataset", logged)
    return log


@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_streamed_start_reads_only_the_chunk_it_starts_in(six_files, reads, fraction):
    # shuffle_buffer 8: chunks of 4 records, here one file each. A start 10% or 90% into the
    # epoch first reads the 4 records of the file that holds its position, nothing before it.
    config = _streamed(six_files, shuffle_buffer=8)
    files = [set(shades) for shades in _file_shades(six_files)]
    reads.clear()  # what the test itself read
    first = _stream(config, int(fraction * 24), 1)[0]
    own_file = next(shades for shades in files if first in shades)
    assert len(reads) >= 4 and set(reads[:4]) == own_file, (first, reads)


@pytest.mark.parametrize("layout,shuffle_buffer,process_index,process_count", [
    ("one_file", 10, 0, 1),  # chunks of 5 cut from one file of 24: 5, 5, 5, 5, 4
    ("six_files", 18, 1, 2),  # a slice of three files of 4: chunks of two files and one
])
def test_streamed_start_anywhere_equals_running_from_zero(
        tiny_tfds, six_files, layout, shuffle_buffer, process_index, process_count):
    config = _streamed(tiny_tfds if layout == "one_file" else six_files, shuffle_buffer)
    n = 24 // process_count
    from_zero = _stream(config, 0, 2 * n + 3, process_index, process_count)
    for epoch in range(2):
        assert sorted(from_zero[epoch * n:(epoch + 1) * n]) == sorted(from_zero[:n])
    assert from_zero[:n] != from_zero[n:2 * n]  # a fresh order each epoch
    # On a chunk boundary and mid-chunk (whatever the order of the chunks, one of 4, 5 and 8 is
    # a boundary and one is not); across the end of the epoch; in the next epoch.
    for start in (4, 5, 8, n - 2, n + 5):
        assert _stream(config, start, 3, process_index, process_count) == \
            from_zero[start:start + 3], start


def test_streamed_epochs_visit_whole_chunks_in_a_fresh_order(six_files):
    # Chunks of one file (4 records): each epoch serves the files one after another, each file's
    # records together (one chunk held at a time), in a new order of files and of records.
    config = _streamed(six_files, shuffle_buffer=8)
    files = [set(shades) for shades in _file_shades(six_files)]
    stream = _stream(config, 0, 72)
    epochs = [stream[k:k + 24] for k in (0, 24, 48)]
    for epoch in epochs:
        served = [set(epoch[k:k + 4]) for k in range(0, 24, 4)]
        assert sorted(map(sorted, served)) == sorted(map(sorted, files))
    assert epochs[0] != epochs[1] != epochs[2]
    file_orders = [[files.index(set(e[k:k + 4])) for k in range(0, 24, 4)] for e in epochs]
    assert len({tuple(order) for order in file_orders}) > 1


def test_streamed_process_slices_are_disjoint_and_cover(six_files):
    config = _streamed(six_files, shuffle_buffer=6)  # chunks of 3 cut from files of 4
    seen = [set(_stream(config, 0, 8, k, 3)) for k in range(3)]
    assert all(len(s) == 8 for s in seen) and set().union(*seen) == set(range(24))


@pytest.fixture()
def corrupt_tfds(six_files, tmp_path):
    """six_files with the image of example 7 replaced by bytes that are not an image."""
    import shutil

    shutil.copytree(six_files, tmp_path / "tfds")
    for path in (tmp_path / "tfds").glob("tiny_jpeg_images/1.0.0/*-train.tfrecord-*"):
        records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
        with tf.io.TFRecordWriter(str(path)) as writer:
            for record in records:
                if _record_shade(record) == 7:
                    example = tf.train.Example.FromString(record)
                    example.features.feature["image"].bytes_list.value[0] = b"not an image"
                    record = example.SerializeToString()
                writer.write(record)
    return str(tmp_path / "tfds")


def test_streamed_corrupt_image_is_skipped_and_counted(corrupt_tfds):
    it = pipeline.train_iterator(_streamed(corrupt_tfds, shuffle_buffer=8), batch_size=1, seed=0)
    shades = [_shades(next(it))[0] for _ in range(24)]  # epoch 0's 23 images, one of epoch 1
    assert sorted(shades[:23]) == sorted(set(range(24)) - {7}) and it.num_skipped == 1


def _key_of_7(six_files):
    """TFDS's key (FILE__INDEX) of example 7 in six_files' train files."""
    for f, shades in enumerate(_file_shades(six_files)):
        if 7 in shades:
            return f"tiny_jpeg_images-train.tfrecord-{f:05d}-of-00006__{shades.index(7)}"


@pytest.mark.parametrize("in_memory_bytes", [0, 2**30])
def test_a_corrupt_tfds_record_is_named_by_its_key(six_files, corrupt_tfds, caplog,
                                                   in_memory_bytes):
    key = _key_of_7(six_files)
    config = _streamed(corrupt_tfds, shuffle_buffer=8, eval_split="train",
                       eval_preprocess="none")
    config.in_memory_bytes = in_memory_bytes  # 0: streamed; else held as an index
    it = pipeline.train_iterator(config, batch_size=2, seed=5, start_step=7)  # from inside epoch 0
    with caplog.at_level(logging.WARNING):
        _take(it, 12)  # to the middle of epoch 1: past the record in each epoch
    named = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert it.num_skipped == 2 and len(named) == 1, [r.getMessage() for r in caplog.records]
    with pytest.raises(sources.BadImageError, match=f"1 image .*: {key};"):
        list(pipeline.eval_iterator(config, batch_size=5))


def test_cut_keeps_files_whole_where_they_fit():
    pieces = [("a", 2, 3), ("b", 0, 4), ("c", 0, 9), ("d", 0, 1)]
    assert pipeline._cut(pieces, 4) == [[("a", 2, 3)], [("b", 0, 4)], [("c", 0, 4)], [("c", 4, 4)],
                                        [("c", 8, 1), ("d", 0, 1)]]
    assert pipeline._cut(pieces, 100) == [pieces]


@pytest.mark.parametrize("value", [0, -3, 2.5, "big"])
def test_bad_shuffle_buffer_raises_a_one_line_value_error(tiny_tfds, value):
    with pytest.raises(ValueError, match=r"^data\.shuffle_buffer=.* must be a positive number"):
        pipeline.train_dataset(_streamed(tiny_tfds, value), batch_size=2, seed=0)


# ---- exact eval --------------------------------------------------------------------------------


def _eval_ids(config, batch_size, processes):
    per_process = []
    for k in range(processes):
        batches = list(pipeline.eval_iterator(config, batch_size=batch_size, process_index=k,
                                              process_count=processes))
        ids = [b["label"][b["mask"]] for b in batches]
        per_process.append((len(batches), np.concatenate(ids) if ids else np.zeros(0, int)))
    return per_process


def test_exact_eval_count_1000_examples_batch_64_eight_devices():
    # fake labels are the example number (num_classes = 1000): every label names one example.
    config = _config(name="fake", image_size=4, num_classes=1000, fake_num_eval=1000,
                     eval_preprocess="none")
    devices = 8
    batches = list(pipeline.eval_iterator(config, batch_size=64))
    assert len(batches) == 16
    for b in batches:
        assert b["image"].shape[0] == 64 and b["image"].shape[0] % devices == 0
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert len(labels) == 1000 and sorted(labels) == list(range(1000))
    # Masked sums, not means of batch means: the padded last batch counts 40 examples.
    assert [int(b["mask"].sum()) for b in batches] == [64] * 15 + [40]


@pytest.mark.parametrize("processes", [2, 3])
def test_exact_eval_across_processes_in_lockstep(processes):
    config = _config(name="fake", image_size=4, num_classes=1000, fake_num_eval=1000,
                     eval_preprocess="none")
    per_process = _eval_ids(config, 32, processes)
    counts = {n for n, _ in per_process}
    assert counts == {-(-(-(-1000 // processes)) // 32)}  # same number of batches everywhere
    union = np.concatenate([ids for _, ids in per_process])
    assert len(union) == 1000 and sorted(union) == list(range(1000))


def test_exact_eval_of_files_across_processes(ident, tiny_tfds):
    config = _config(name=f"imagefolder:{ident}", image_size=4, eval_preprocess="none")
    ids = []
    for k in range(2):
        batches = list(pipeline.eval_iterator(config, batch_size=8, process_index=k, process_count=2))
        assert len(batches) == 2  # slices of 12 and 13, batch 8
        ids.extend(np.concatenate([_ids(b, b["mask"]) for b in batches]).tolist())
    assert sorted(ids) == list(range(25))
    config = _config(name="tiny_jpeg_images", data_dir=tiny_tfds, image_size=20,
                     eval_preprocess="none", in_memory_bytes=0)
    shades = []
    for k in range(3):
        batches = list(pipeline.eval_iterator(config, batch_size=3, process_index=k, process_count=3))
        assert len(batches) == 2  # slices of 3, 3 and 4 examples
        for b in batches:
            shades.extend(_shades(b, b["mask"]))
    assert sorted(shades) == list(range(10))


# ---- errors ------------------------------------------------------------------------------------


def test_missing_tfds_data_set_says_how_to_prepare_it(tmp_path):
    with pytest.raises(sources.DatasetNotFoundError) as info:
        pipeline.info(_config(name="cifar10", data_dir=str(tmp_path)))
    message = str(info.value)
    assert "'cifar10'" in message and str(tmp_path) in message and "tfds build cifar10" in message
    assert "\n" not in message and info.value.__cause__ is None
    with pytest.raises(sources.DatasetNotFoundError) as info:
        pipeline.train_iterator(_config(name="imagenet2012", data_dir=str(tmp_path)), batch_size=2,
                                seed=0)
    message = str(info.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert os.path.join(str(tmp_path), "downloads", "manual") in message
    assert "tfds build imagenet2012" in message and info.value.__cause__ is None


@pytest.mark.parametrize("fields,words", [
    (dict(name="no_such_data_set_xyz"), ["data.name", "no_such_data_set_xyz", "imagefolder"]),
    (dict(name="fake", train_preprocess="alexnet"), ["data.train_preprocess", "alexnet", "paper"]),
    (dict(name="fake", eval_preprocess="full"), ["data.eval_preprocess", "multi_scale"]),
    (dict(name="fake", dtype="float16"), ["data.dtype", "bfloat16"]),
    (dict(name="digits", num_classes=100), ["data.num_classes=100", "'digits'", "10"]),
    (dict(name="imagefolder:/no/such/dir"), ["/no/such/dir"]),
])
def test_bad_values_raise_one_line_value_errors(fields, words):
    with pytest.raises(ValueError) as info:
        pipeline.info(_config(**fields))
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_missing_split_names_the_splits(folder):
    with pytest.raises(ValueError, match="'val'.*test, train"):
        pipeline.info(_config(name=f"imagefolder:{folder}", eval_split="val"))


# ---- corrupt files -----------------------------------------------------------------------------


@pytest.fixture()
def corrupt(ident, tmp_path):
    """The ident folder's train split with one file's bytes replaced by garbage."""
    import shutil

    root = tmp_path / "corrupt"
    shutil.copytree(ident, root)
    victim = root / "train" / CLASSES[7 % 3] / "7.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_corrupt_image_is_named_and_skipped_in_training_an_error_in_eval(corrupt, caplog):
    config = _config(name=f"imagefolder:{corrupt}", image_size=4, train_preprocess="none",
                     eval_preprocess="none", eval_split="train")
    it = pipeline.eval_iterator(config, batch_size=16)
    batches = []
    with caplog.at_level(logging.WARNING), pytest.raises(sources.BadImageError, match="7.png"):
        for batch in it:  # every batch, then the error
            batches.append(batch)
    ids = np.concatenate([_ids(b, b["mask"]) for b in batches])
    assert len(batches) == 3 and sorted(ids) == sorted(set(range(40)) - {7})
    assert it.num_skipped == 1
    assert any("7.png" in r.getMessage() for r in caplog.records)
    train = pipeline.train_iterator(config, batch_size=13, seed=0)
    ids = np.concatenate([_ids(b) for b in _take(train, 3)])  # 39 of the first epoch
    assert sorted(ids) == sorted(set(range(40)) - {7}) and train.num_skipped == 1


def test_restart_after_a_corrupt_file_does_not_read_it(corrupt):
    config = _config(name=f"imagefolder:{corrupt}", image_size=4, train_preprocess="none")
    positions = np.concatenate([b["position"] for b in pipeline.train_dataset(
        config, batch_size=1, seed=0).take(39).as_numpy_iterator()])
    bad = int(np.setdiff1d(np.arange(40), positions)[0])  # where file 7 sits in epoch 0
    if bad >= 39:
        pytest.skip("the corrupt file is last in epoch 0 for this seed")
    restarted = pipeline.train_iterator(config, batch_size=1, seed=0, start_step=bad + 1)
    _take(restarted, 39 - bad)  # to the end of epoch 0, past the skipped start
    assert restarted.num_skipped == 0


# ---- multi-scale testing and the per-pixel mean (Sec. 3.4) --------------------------------------

SHAPES = ((20, 40), (30, 20), (16, 16), (21, 28), (28, 21), (18, 27), (40, 12), (24, 30), (15, 45))


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    """PNGs of one colour each, (i, 7, 9) saying which file it is, of the assorted SHAPES (ImageNet's
    variety of aspect ratios, small): 9 train, 27 test."""
    root = tmp_path_factory.mktemp("shaped")
    for split, n in (("train", 9), ("test", 27)):
        for i in range(n):
            directory = root / split / CLASSES[i % 3]
            os.makedirs(directory, exist_ok=True)
            _save(directory / f"{i}.png", np.full((*SHAPES[i % len(SHAPES)], 3), (i, 7, 9), np.uint8),
                  fmt="PNG")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Smooth random PNGs of the assorted SHAPES, lossless so that PIL reads what TensorFlow does:
    9 train, 9 test."""
    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "test"):
        for i, shape in enumerate(SHAPES):
            directory = root / split / CLASSES[i % 3]
            os.makedirs(directory, exist_ok=True)
            _save(directory / f"{i}.png", _smooth(*shape, seed=i + 100 * (split == "test")),
                  fmt="PNG")
    return root


def _multi_scale(**fields):
    fields.setdefault("eval_preprocess", "multi_scale")
    fields.setdefault("image_size", 8)
    fields.setdefault("eval_scales", (8, 12))
    return _config(**fields)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_multi_scale_batches_of_each_source(source, folder, tiny_tfds):
    config = _multi_scale(**SOURCES[source](folder, tiny_tfds))
    info = pipeline.info(config)
    sizes = tuple(range(3, 28))  # a size of its own for each class, to see that each is used
    batches = list(pipeline.multi_scale_iterator(config, batch_sizes=sizes))
    for batch in batches:
        aspect = batch["aspect"]
        assert set(batch) == {"aspect", "views", "label", "mask"}
        assert [v.shape for v in batch["views"]] == [
            (sizes[aspect + 12], *preprocess.class_shape(aspect, scale), 3) for scale in (8, 12)]
        assert batch["label"].shape == batch["mask"].shape == (sizes[aspect + 12],)
        assert np.all((0 <= batch["label"]) & (batch["label"] < info.num_classes))
        assert all(not v[~batch["mask"]].any() for v in batch["views"])  # padding is zeros
    assert sum(int(b["mask"].sum()) for b in batches) == info.num_eval
    part_filled = [b["aspect"] for b in batches if not b["mask"].all()]
    assert len(set(part_filled)) == len(part_filled)  # at most one a class: its last


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_multi_scale_counts_each_image_once_in_the_class_of_its_shape(shaped, processes):
    config = _multi_scale(name=f"imagefolder:{shaped}", dtype="uint8")
    seen = []
    for k in range(processes):
        for batch in pipeline.multi_scale_iterator(config, batch_sizes=(2,) * 25, process_index=k,
                                                   process_count=processes):
            ids = batch["views"][0][:, 0, 0, 0][batch["mask"]].astype(int)
            for i, label in zip(ids, batch["label"][batch["mask"]]):
                h, w = SHAPES[i % len(SHAPES)]
                ratio = max(h, w) / min(h, w)
                steps = min(round(12 * np.log2(ratio)), 12)
                assert batch["aspect"] == (-steps if h > w else steps) and label == i % 3
            seen.extend(ids)
    assert sorted(seen) == list(range(27))


def test_multi_scale_needs_its_preprocessing(shaped):
    with pytest.raises(ValueError, match="multi_scale"):
        next(pipeline.multi_scale_iterator(_config(name=f"imagefolder:{shaped}"), batch_sizes=(2,) * 25))


def test_pixel_mean_is_the_mean_of_the_resized_training_images(photos):
    config = _config(name=f"imagefolder:{photos}", image_size=8, subtract_pixel_mean=True,
                     dtype="float32")
    resized = [tf.image.resize(np.asarray(Image.open(path)), (8, 8)).numpy()
               for path in sorted((photos / "train").glob("*/*.png"))]
    assert len(resized) == len(SHAPES)
    np.testing.assert_allclose(pipeline.pixel_mean(config), np.mean(resized, axis=0), atol=1e-4)
    total, count = pipeline.pixel_mean_sums(config, 1, 2)  # one process's share
    assert count == len(SHAPES) - len(SHAPES) // 2 and total.shape == (8, 8, 3)


def test_train_and_eval_subtract_the_pixel_mean(photos):
    fields = dict(name=f"imagefolder:{photos}", image_size=8, dtype="float32", scale_range=(10, 16),
                  eval_scales=(8, 12), resize_size=10)
    mean = pipeline.pixel_mean(_config(subtract_pixel_mean=True, **fields))
    assert mean.std() > 1
    for train in ("paper", "inception"):
        plain, subtracted = (next(pipeline.train_iterator(_config(
            train_preprocess=train, subtract_pixel_mean=on, **fields), batch_size=4, seed=3))
            for on in (False, True))
        # The mean is subtracted before the flip (as Caffe does), where the pixels were.
        for a, b in zip(plain["image"], subtracted["image"]):
            assert min(np.abs(a - b - m).max() for m in (mean, mean[:, ::-1])) < 1e-3
        assert not np.allclose(mean, mean[:, ::-1], atol=1)
    for evaluation in ("center", "ten_crop"):
        plain, subtracted = (next(pipeline.eval_iterator(_config(
            eval_preprocess=evaluation, subtract_pixel_mean=on, **fields), batch_size=4))
            for on in (False, True))
        np.testing.assert_allclose(subtracted["image"], plain["image"] - mean, atol=1e-3)
    plain, subtracted = (list(pipeline.multi_scale_iterator(_config(
        eval_preprocess="multi_scale", subtract_pixel_mean=on, **fields), batch_sizes=(4,) * 25))
        for on in (False, True))
    for a, b in zip(plain, subtracted):
        for view_a, view_b in zip(a["views"], b["views"]):
            resized = tf.image.resize(mean, view_a.shape[1:3]).numpy()
            np.testing.assert_allclose(view_b[a["mask"]], view_a[a["mask"]] - resized, atol=1e-3)
