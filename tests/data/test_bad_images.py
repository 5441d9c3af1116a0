"""Image folders with files that do not decode, and with classes that have no training images.

Each image that does not decode is named in the log (once); an eval image that does not decode
stops the evaluation naming it (`sources.BadImageError`), so that no eval counts fewer examples than
its split holds; a class with no training images is refused by `pipeline.info`, and so by the command
(exit 2, nothing written).
"""

import logging
import os
import subprocess

import ml_collections
import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import pipeline, sources
from runs import REPO, environment, free_port, main_command


def _config(root, **fields):
    fields = {"name": f"imagefolder:{root}", "image_size": 8, "train_preprocess": "none",
              "eval_preprocess": "none", "mean": (0.0,) * 3, "std": (1.0,) * 3, **fields}
    return ml_collections.ConfigDict(fields)


def _folder(root, layout):
    """root/SPLIT/CLASS/i.jpg: `layout` maps each split to {class: number of 8x8 JPEGs}."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", "JPEG")
    return root


def _too_large_jpeg() -> bytes:
    """A JPEG whose header says 16000 x 16000: TensorFlow refuses to decode it ("Image too
    large"), as it refuses a real one, without the test making 768 MB of pixels."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(buffer, "JPEG")
    jpeg = bytearray(buffer.getvalue())
    frame = jpeg.find(b"\xff\xc0") + 5  # baseline frame header: precision, then height, width
    jpeg[frame:frame + 4] = (16000).to_bytes(2, "big") * 2
    return bytes(jpeg)


def _add_bad_files(directory):
    """A file of zero bytes, a text file named .jpg and a JPEG too large to decode; their paths."""
    bad = {"empty.jpg": b"", "notes.jpg": b"not an image, just text\n",
           "huge.jpg": _too_large_jpeg()}
    for name, content in bad.items():
        (directory / name).write_bytes(content)
    return sorted(str(directory / name) for name in bad)


def _messages(caplog):
    return [record.getMessage() for record in caplog.records]


# ---- images that do not decode ------------------------------------------------------------------


@pytest.mark.parametrize("preprocessing", ["none", "inception"])
def test_each_train_image_that_does_not_decode_is_named_once(tmp_path, caplog, preprocessing):
    root = _folder(tmp_path, {"train": {"ant": 3, "bee": 3}, "test": {"ant": 1, "bee": 1}})
    bad = _add_bad_files(root / "train" / "bee")
    it = pipeline.train_iterator(_config(root, train_preprocess=preprocessing), batch_size=3, seed=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):  # 15 of the 6 good images an epoch: two epochs and more
            next(it)
    assert it.num_skipped >= 6  # each bad file, in each of two epochs
    for path in bad:
        assert sum(path in message for message in _messages(caplog)) == 1, (path, _messages(caplog))
    good = str(root / "train" / "bee" / "0.jpg")
    assert not any(good in message for message in _messages(caplog))


@pytest.mark.parametrize("preprocessing", ["none", "center"])
def test_an_eval_image_that_does_not_decode_stops_the_eval_naming_it(tmp_path, preprocessing):
    root = _folder(tmp_path, {"train": {"ant": 2, "bee": 2}, "test": {"ant": 5, "bee": 4}})
    bad = _add_bad_files(root / "test" / "ant")
    it = pipeline.eval_iterator(_config(root, eval_preprocess=preprocessing), batch_size=4)
    batches = []
    with pytest.raises(ValueError) as raised:
        for batch in it:
            batches.append(batch)
    assert isinstance(raised.value, sources.BadImageError)
    message = str(raised.value)
    assert "\n" not in message and all(path in message for path in bad), message
    # Every batch came before the error, as many as the whole split makes: multi-host eval steps
    # stay in lockstep up to it.
    assert len(batches) == -(-12 // 4) and sum(int(b["mask"].sum()) for b in batches) == 9


def test_on_the_devices_a_train_image_that_does_not_decode_is_left_out_and_an_eval_one_stops_the_eval(
        tmp_path, caplog):
    from resnet_jax.data import on_device
    root = _folder(tmp_path, {"train": {"ant": 2, "bee": 2}, "test": {"ant": 2, "bee": 2}})
    bad_train, bad_eval = _add_bad_files(root / "train" / "bee"), _add_bad_files(root / "test" / "ant")
    config = _config(root, on_device=True)
    with caplog.at_level(logging.WARNING):
        images, labels = on_device.split_arrays(config, train=True)
    assert images.shape == (4, 8, 8, 3) and labels.tolist() == [0, 0, 1, 1]
    for path in bad_train:
        assert sum(path in message for message in _messages(caplog)) == 1, (path, _messages(caplog))
    with pytest.raises(sources.BadImageError) as raised:
        list(on_device.eval_iterator(config, batch_size=4))
    message = str(raised.value)
    assert "\n" not in message and message.startswith("eval data data.name=")
    assert "3 images that do not decode" in message and all(path in message for path in bad_eval)


def test_a_multi_scale_eval_image_that_does_not_decode_stops_it_naming_it(tmp_path):
    root = _folder(tmp_path, {"train": {"ant": 2, "bee": 2}, "test": {"ant": 3, "bee": 3}})
    bad = _add_bad_files(root / "test" / "bee")
    config = _config(root, eval_preprocess="multi_scale", eval_scales=(8,))
    with pytest.raises(sources.BadImageError) as raised:
        list(pipeline.multi_scale_iterator(config, batch_sizes=(4,) * 25))
    assert all(path in str(raised.value) for path in bad)


# ---- classes without training images ------------------------------------------------------------


def test_an_empty_class_directory_is_refused_naming_it(tmp_path):
    root = _folder(tmp_path, {"train": {"ant": 2, "bee": 2, "cat": 0},
                              "test": {"ant": 1, "bee": 1}})
    with pytest.raises(ValueError, match=r"'cat'.*'train'") as raised:
        pipeline.info(_config(root, eval_split="test"))
    assert "\n" not in str(raised.value) and "'ant'" not in str(raised.value)


def test_a_class_only_in_the_eval_split_is_refused_naming_it(tmp_path):
    root = _folder(tmp_path, {"train": {"ant": 2, "bee": 2},
                              "val": {"ant": 1, "bee": 1, "cat": 1, "dog": 1}})
    with pytest.raises(ValueError, match=r"'cat', 'dog'.*'train'.*val"):
        pipeline.info(_config(root, eval_split="val"))


def test_a_class_outside_the_train_part_of_a_split_is_refused(tmp_path):
    """One split cut in two by a slice: a class whose only image falls in the eval part."""
    root = _folder(tmp_path, {"train": {"ant": 4, "bee": 4, "cat": 1}})
    names, files = sources.folder(str(root))
    cat = [names[label] for _, label in files["train"]].index("cat")
    config = _config(root, train_split=f"train[{cat + 1}:]", eval_split=f"train[:{cat + 1}]")
    with pytest.raises(ValueError, match=rf"'cat'.*'train\[{cat + 1}:\]'"):
        pipeline.info(config)
    config.train_split, config.eval_split = f"train[{cat}:]+train[:{cat}]", f"train[:{cat}]"
    assert pipeline.info(config).num_classes == 3


def test_digits_with_too_few_training_rows_are_refused():
    config = ml_collections.ConfigDict(dict(name="digits", image_size=8, train_split="train[:5]"))
    with pytest.raises(ValueError, match=r"'5', .* no images in data.train_split='train\[:5\]'"):
        pipeline.info(config)


def _train_on(root, workdir, num_classes, **changes):
    """The real command on the image folder `root`: (its result, the last line of its stderr)."""
    command = main_command(workdir, **{"data.name": f"imagefolder:{root}",
                                       "data.num_classes": num_classes,
                                       "train.batch_size": 4, "eval.batch_size": 4, **changes})
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True,
                            timeout=300)
    return result, result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_command_refuses_an_empty_class_and_writes_nothing(tmp_path):
    root = _folder(tmp_path / "images", {"train": {"ant": 4, "bee": 4, "cat": 0},
                                         "test": {"ant": 2, "bee": 2}})
    workdir = tmp_path / "run"
    result, last = _train_on(root, workdir, 3)
    assert result.returncode == 2, result.stderr[-2000:]
    assert last.startswith("resnet_jax: error: ") and "'cat'" in last and "'train'" in last, last
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("on_device", [False, True])
def test_a_run_whose_eval_image_does_not_decode_stops_in_one_line_naming_it(tmp_path, on_device):
    root = _folder(tmp_path / "images", {"train": {"ant": 4, "bee": 4}, "test": {"ant": 2, "bee": 2}})
    (root / "test" / "bee" / "broken.jpg").write_bytes(b"")
    result, last = _train_on(root, tmp_path / "run", 2, **{"data.on_device": on_device})
    assert result.returncode == 1, result.stderr[-2000:]
    assert last.startswith("resnet_jax: error: step 3: ") and "broken.jpg" in last, last
    assert "checkpoint" in last and "Traceback" not in result.stderr


def test_data_on_device_refuses_a_class_with_no_training_images(tmp_path):
    from resnet_jax.data import on_device
    root = _folder(tmp_path / "images", {"train": {"ant": 2, "cat": 0}, "test": {"ant": 1, "cat": 1}})
    with pytest.raises(ValueError, match=r"class 'cat' has no images in data.train_split='train'"):
        on_device.info(_config(root, on_device=True))
    with pytest.raises(ValueError, match=r"'5', .* no images in data.train_split='train\[:5\]'"):
        on_device.info(_config("", name="digits", train_split="train[:5]", on_device=True))


@pytest.mark.slow
def test_an_eval_image_that_does_not_decode_on_one_process_stops_every_process(tmp_path):
    # Process 1's pass raised after its last batch while process 0 went on to the next
    # collective, and waited there for a process that was leaving.

    root = _folder(tmp_path / "images", {"train": {"ant": 4, "bee": 4}, "test": {"ant": 2, "bee": 2}})
    (root / "test" / "bee" / "broken.jpg").write_bytes(b"")
    address = f"localhost:{free_port()}"
    processes = [subprocess.Popen(
        main_command(tmp_path / "run", f"--coordinator_address={address}", "--num_processes=2",
                     f"--process_id={i}", **{"data.name": f"imagefolder:{root}",
                                             "data.num_classes": 2, "train.batch_size": 8,
                                             "eval.batch_size": 8}),
        cwd=REPO, env=environment(devices=4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        lasts = [p.communicate(timeout=300)[1].strip().splitlines()[-1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [1, 1], lasts
    named = [i for i, last in enumerate(lasts) if "broken.jpg" in last]
    assert len(named) == 1, lasts
    other = lasts[1 - named[0]]
    assert other.startswith("resnet_jax: error: step 3: ") and \
        f"the eval images of process {named[0]} include some that do not decode" in other, lasts
    assert all("checkpoint" in last for last in lasts), lasts
