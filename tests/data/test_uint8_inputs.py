"""data.dtype="uint8": the host sends rounded pixels and the devices normalise them, giving the
images the host pipeline makes with dtype float32 (to within the rounding of the pixels)."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import device_inputs, pipeline
from resnet_jax.distributed import sharding

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
# A pixel rounded to the nearest integer moves its normalised value by at most 0.5 / std.
TOLERANCE = 0.5 / min(STD) + 1e-4


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEG photos with detail at every scale: 2 classes x 5, in train and test."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("a", "b"):
            os.makedirs(root / split / name)
            for i in range(5):
                h, w = rng.integers(40, 90, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=90)
    return root


def _config(root, dtype, **fields):
    return ml_collections.ConfigDict(dict(
        name=f"imagefolder:{root}", train_split="train", eval_split="test", image_size=32,
        resize_size=36, scale_range=(36, 60), mean=MEAN, std=STD, dtype=dtype, **fields))


def _on_device(config, batches):
    normalise = jax.jit(device_inputs.normaliser(config))  # as inside the steps
    return [jax.device_get(normalise(b)) for b in sharding.prefetch(batches, sharding.make_mesh())]


@pytest.mark.parametrize("preprocess,lighting,resize", [
    ("inception", 0.0, "bilinear"), ("paper", 0.0, "bilinear"), ("paper", 0.5, "bilinear"),
    ("none", 0.0, "bilinear"), ("inception", 0.0, "bicubic"), ("paper", 0.5, "nearest")])
def test_train_pixels_normalised_on_device_equal_the_host_pipeline(photos, preprocess, lighting,
                                                                   resize):
    fields = dict(train_preprocess=preprocess, pca_lighting=lighting, resize_method=resize)
    host, device = _config(photos, "float32", **fields), _config(photos, "uint8", **fields)
    pixels = next(pipeline.train_iterator(device, batch_size=8, seed=3))
    assert pixels["image"].dtype == np.uint8
    assert ("lighting" in pixels) == (lighting > 0 and preprocess != "none")
    want = next(pipeline.train_iterator(host, batch_size=8, seed=3))
    [have] = _on_device(device, [pixels])
    assert have["image"].dtype == np.float32 and "lighting" not in have
    np.testing.assert_array_equal(have["label"], want["label"])
    expected = want["image"]
    if resize == "bicubic":  # overshoots 0-255; the uint8 pixels saturate, as PIL's do
        mean, std = np.float32(MEAN), np.float32(STD)
        expected = np.clip(expected, -mean / std, (255 - mean) / std)
        assert not np.allclose(expected, want["image"])
    np.testing.assert_allclose(have["image"], expected, atol=TOLERANCE, rtol=0)
    if lighting:  # the shipped offset is what separates the two, not noise
        [unlit] = _on_device(device, [{k: v for k, v in pixels.items() if k != "lighting"}])
        assert np.abs(unlit["image"] - want["image"]).max() > 10 * TOLERANCE


@pytest.mark.parametrize("preprocess", ["center", "ten_crop"])
def test_eval_pixels_normalised_on_device_equal_the_host_pipeline(photos, preprocess):
    host = _config(photos, "float32", eval_preprocess=preprocess)
    device = _config(photos, "uint8", eval_preprocess=preprocess)
    expected = list(pipeline.eval_iterator(host, batch_size=4))
    got = _on_device(device, pipeline.eval_iterator(device, batch_size=4))
    assert [b["mask"].sum() for b in got] == [b["mask"].sum() for b in expected] == [4, 4, 2]
    for want, have in zip(expected, got):
        assert have["image"].shape == want["image"].shape
        np.testing.assert_array_equal(have["mask"], want["mask"])
        keep = want["mask"]  # padding is masked out of every metric, whatever its pixels
        np.testing.assert_allclose(have["image"][keep], want["image"][keep], atol=TOLERANCE,
                                   rtol=0)


def test_host_dtypes_pass_unchanged(photos):
    batch = {"image": np.ones((1, 2, 2, 3), np.float32), "label": np.zeros((1,), np.int32)}
    for dtype in ("float32", "bfloat16"):
        assert device_inputs.normaliser(_config(photos, dtype))(batch) is batch


@pytest.mark.parametrize("fields", [dict(train_preprocess="cifar"),
                                    dict(train_preprocess="none", eval_preprocess="none",
                                         subtract_pixel_mean=True)])
def test_uint8_refuses_what_needs_normalised_images_on_the_host(photos, fields):
    with pytest.raises(ValueError) as info:
        pipeline.info(_config(photos, "uint8", **fields))
    message = str(info.value)
    assert "\n" not in message and "data.dtype='uint8'" in message and "'float32'" in message
