"""data.on_device=True: the train split in device memory, batches gathered and augmented inside
the step (on_device.py); the run without TensorFlow."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import on_device, pipeline, preprocess, sources
from resnet_jax.run import jsonl, validate
from resnet_jax.training import loop, metrics, preemption
from runs import REPO, assert_trees_close, environment, latest_params, rows_without_speed, small_config

ON_DEVICE = {"data.on_device": True}


def _numpy_pad_crop_flip(images, dy, dx, flip, p):
    """An independent pad, crop and flip: the paper's Sec. 4.2 for given offsets."""
    n, h, w, c = images.shape
    out = np.empty_like(images)
    for i in range(n):
        padded = np.zeros((h + 2 * p, w + 2 * p, c), images.dtype)
        padded[p:p + h, p:p + w] = images[i]
        crop = padded[dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def test_augmentation_pads_with_zeros_crops_within_the_padding_and_flips():
    p, n = 4, 64
    dy, dx, flip = map(np.asarray, on_device.crop_flip_draws(jax.random.key(3), n, p))
    assert dy.min() == 0 and dy.max() == 2 * p and dx.min() == 0 and dx.max() == 2 * p
    assert 0.25 < flip.mean() < 0.75
    images = np.random.default_rng(0).normal(size=(n, 8, 8, 3)).astype(np.float32)
    got = np.asarray(jax.jit(on_device.pad_crop_flip, static_argnums=4)(images, dy, dx, flip, p))
    np.testing.assert_array_equal(got, _numpy_pad_crop_flip(images, dy, dx, flip, p))
    # The top-left crop unflipped: p rows and columns of zeros.
    np.testing.assert_array_equal(on_device.pad_crop_flip(images[:1], np.zeros(1, int),
                                                          np.zeros(1, int), np.zeros(1, bool),
                                                          p)[0, :p], 0)

    # The whole augmentation: normalised first, so the padding is the mean.
    s = preprocess.settings(dict(on_device=True, train_preprocess="cifar", eval_preprocess="none",
                                 image_size=8, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0)))
    pixels = np.random.default_rng(1).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    got = np.asarray(jax.jit(lambda x, k: on_device.augment(x, k, s))(pixels, jax.random.key(3)))
    normalised = (pixels.astype(np.float32) - np.float32([10, 20, 30])) * (
        np.float32(1) / np.float32([2, 4, 5]))
    np.testing.assert_allclose(got, _numpy_pad_crop_flip(normalised, dy, dx, flip, p), rtol=0,
                               atol=0)


def test_the_rows_of_a_step_are_a_function_of_seed_and_step_and_each_epoch_a_permutation():
    n, batch = 10, 4
    fn = jax.jit(on_device.rows, static_argnums=(0, 2, 3))
    steps = [np.asarray(fn(0, jnp.int32(k), batch, n)) for k in range(10)]  # 4 epochs
    stream = np.concatenate(steps)
    for e in range(4):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # a fresh order each epoch
    np.testing.assert_array_equal(np.asarray(fn(0, jnp.int32(7), batch, n)), steps[7])
    assert not np.array_equal(np.asarray(fn(1, jnp.int32(7), batch, n)), steps[7])


def _setup_error(**changes):
    with pytest.raises(validate.SetupError) as error:
        loop.setup(small_config(**ON_DEVICE, **changes), "/nonexistent/unused")
    message = str(error.value)
    assert "\n" not in message and "data.on_device" in message
    return message


def test_unsupported_data_are_refused_in_one_line(monkeypatch):
    assert "train_preprocess 'cifar' or 'none'" in _setup_error(**{"data.train_preprocess": "paper"})
    assert "eval_preprocess 'none'" in _setup_error(**{"data.eval_preprocess": "center"})
    assert "digits, imagefolder:PATH" in _setup_error(**{"data.name": "fake"})
    monkeypatch.setattr(on_device, "MAX_BYTES", 1000)
    assert "at most 1,000 bytes" in _setup_error()


def test_digits_and_images_resized_without_tensorflow_equal_tensorflow_s():
    tf = pytest.importorskip("tensorflow")
    from sklearn import datasets, model_selection  # pylint: disable=import-outside-toplevel
    loaded = datasets.load_digits()
    raw = np.round(loaded.images * (255.0 / 16.0)).astype(np.float32)[..., None]
    train, test = model_selection.train_test_split(  # the 1,497 / 300 split of the docstring
        np.arange(len(raw)), test_size=300, random_state=0, stratify=loaded.target)
    for size in (8, 16, 32, 20):
        want = tf.image.resize(raw, (size, size), method="bilinear").numpy()
        want = np.repeat(np.clip(np.round(want), 0, 255).astype(np.uint8), 3, axis=-1)
        for split, rows in (("train", np.sort(train)), ("test", np.sort(test))):
            images, labels = sources.digits(size)[split]
            np.testing.assert_array_equal(images, want[rows], err_msg=f"{size} {split}")
            np.testing.assert_array_equal(labels, loaded.target[rows])
    # Down and up, as image folders of other sizes are resized.
    images = np.random.default_rng(0).integers(0, 256, (4, 37, 23, 3)).astype(np.float32)
    for size in (8, 32, 50):
        want = tf.image.resize(images, (size, size), method="bilinear", antialias=False).numpy()
        np.testing.assert_allclose(sources.resize_bilinear(images, size), want, rtol=0,
                                   atol=1e-4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A CIFAR-layout image folder: 3 classes of 8x8 PNGs (one grey, one 12x10 to resize)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for c in ("cat", "ant", "bee"):
            os.makedirs(root / split / c)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i == 1:
                    image = image.convert("L")
                if i == 2:
                    image = image.resize((10, 12))
                image.save(root / split / c / f"{i}.png")
    return root


def test_an_image_folder_is_labelled_as_tfds_labels_it(folder):
    pytest.importorskip("tensorflow_datasets")
    names, files = sources.folder(str(folder))
    assert len(names) == 3
    tfds_examples = pipeline.tfds.ImageFolder(str(folder))._split_examples
    tfds_names = pipeline.tfds.ImageFolder(str(folder)).info.features["label"].names
    for split in ("train", "test"):
        want = sorted((e.image_path, tfds_names.index(e.label)) for e in tfds_examples[split])
        assert sorted(files[split]) == want
    images, labels = on_device._Source(ml_collections.ConfigDict(dict(
        name=f"imagefolder:{folder}", image_size=8))).load("train[2:]+test", train=True)
    assert images.shape == (22, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (22,)


def test_eval_slices_cover_the_split_once_in_as_many_batches_on_every_process():
    config = small_config(**ON_DEVICE).data
    count = []
    for index in range(3):
        batches = list(on_device.eval_iterator(config, batch_size=64, process_index=index,
                                               process_count=3))
        count.append(len(batches))
        assert all(b["image"].shape == (64, 8, 8, 3) and b["image"].dtype == np.uint8
                   for b in batches)
        assert sum(int(b["mask"].sum()) for b in batches) == 100  # 300 test digits over 3
    assert count == [2, 2, 2]


@pytest.mark.slow
def test_a_resumed_run_trains_as_an_uninterrupted_one(tmp_path, monkeypatch):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    config = small_config(**ON_DEVICE, **{"data.train_preprocess": "cifar", "log_every_steps": 2})
    loop.train_and_evaluate(config, whole)

    # SIGTERM after the third step (as a preemption): the run saves step 3 and stops.
    hooks = metrics.profile_hooks
    monkeypatch.setattr(metrics, "profile_hooks", lambda *args: hooks(*args) + [
        lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM)])
    with pytest.raises(preemption.Preempted):
        loop.train_and_evaluate(config, parts)
    assert latest_params(parts)[0] == 3
    monkeypatch.setattr(metrics, "profile_hooks", hooks)
    loop.train_and_evaluate(config, parts)
    assert rows_without_speed(parts) == rows_without_speed(whole)
    assert_trees_close(latest_params(parts)[1], latest_params(whole)[1], rtol=0, atol=0)


EIGHT_DEVICES = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh
    from resnet_jax.data import on_device
    from resnet_jax.distributed import sharding
    from runs import small_config
    config = small_config(**{"data.on_device": True, "data.train_preprocess": "cifar"}).data
    def batches(mesh, replicate_bytes):
        on_device.REPLICATE_BYTES = replicate_bytes
        resident = on_device.place(config, mesh)
        assert resident.sharded == (replicate_bytes == 0)
        fn = jax.jit(resident.batch_fn(config, 32, 0))
        return [jax.device_get(fn(resident.arrays, jax.numpy.int32(k))) for k in (0, 23, 46)]
    devices = jax.devices()
    want = batches(Mesh(np.array(devices[:1]), ("data",)), 2**28)
    for mesh, limit in ((sharding.make_mesh(), 2**28), (sharding.make_mesh(), 0),
                        (Mesh(np.array(devices).reshape(2, 4), ("replica", "data")), 0)):
        for have, wanted in zip(batches(mesh, limit), want):
            for key in wanted:
                np.testing.assert_array_equal(have[key], wanted[key])
    print("same batches", len(devices))
""")


@pytest.mark.slow
def test_eight_devices_replicated_or_sharded_gather_the_batches_of_one():
    env = environment(devices=8, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same batches 8" in result.stdout


WITHOUT_TENSORFLOW = textwrap.dedent("""
    import runpy, sys
    sys.modules["tensorflow"] = None
    sys.modules["tensorflow_datasets"] = None
    quickstart, cifar_workdir, folder = sys.argv[1:4]
    sys.argv = ["resnet_jax.main", "--config=configs/quickstart.py", "--workdir=" + quickstart,
                "--config.data.on_device=True", "--config.model.name=cifar_resnet8",
                "--config.data.image_size=8", "--config.train.batch_size=32",
                "--config.train.num_steps=4", "--config.eval.every_steps=2",
                "--config.checkpoint.every_steps=2", "--config.log_every_steps=2"]
    try:
        runpy.run_module("resnet_jax.main", run_name="__main__")
    except SystemExit as stop:
        assert not stop.code, stop.code
    from configs import cifar
    from resnet_jax.training import loop
    config = cifar.get_config("depth=8")
    config.data.update(name="imagefolder:" + folder, image_size=8, on_device=True, num_classes=3)
    config.train.update(batch_size=6, num_steps=2)
    config.eval.update(batch_size=6, every_steps=2)
    config.checkpoint.every_steps = 2
    config.log_every_steps = 1
    loop.train_and_evaluate(config, cifar_workdir)
    assert all(sys.modules.get(m) is None for m in ("tensorflow", "tensorflow_datasets"))
    print("finished without tensorflow")
""")


@pytest.mark.slow
def test_runs_without_tensorflow(tmp_path, folder):
    quickstart, cifar_run = tmp_path / "quickstart", tmp_path / "cifar"
    env = environment()
    result = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, str(quickstart),
                             str(cifar_run), str(folder)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished without tensorflow" in result.stdout
    rows = jsonl.read_rows(quickstart)
    assert [row["step"] for row in rows] == [2, 4] and "eval_accuracy" in rows[-1]
    assert "step 4/4 (100.0%), " in result.stderr  # the progress line
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(quickstart))
    rows = jsonl.read_rows(cifar_run)
    assert [row["step"] for row in rows] == [1, 2] and "eval_accuracy" in rows[-1]
