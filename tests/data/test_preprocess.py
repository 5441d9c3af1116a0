"""Preprocessing of one example: crop windows, odd files, shapes, ranges, determinism."""

import io

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from resnet_jax.data import preprocess

SHAPES = [(375, 500), (500, 375), (32, 32), (1, 1), (3, 300), (300, 3), (224, 224), (17, 230)]


def _config(**fields):
    return ml_collections.ConfigDict(fields)


def _settings(**fields):
    fields.setdefault("image_size", 24)
    fields.setdefault("mean", (0.0, 0.0, 0.0))
    fields.setdefault("std", (1.0, 1.0, 1.0))
    return preprocess.settings(_config(**fields))


def _key(i):
    return tf.constant([7, i], tf.int64)


def _jpeg(array, **kw):
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", **kw)
    return out.getvalue()


def _png(array):
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def _smooth(h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    return tf.cast(tf.image.resize(small, (h, w)), tf.uint8).numpy()


def _inside(window, shape):
    y, x, h, w = (int(v) for v in window)
    return h >= 1 and w >= 1 and y >= 0 and x >= 0 and y + h <= shape[0] and x + w <= shape[1]


@pytest.mark.parametrize("shape", SHAPES)
def test_inception_windows_stay_inside_and_follow_the_ranges(shape):
    fitted = 0
    for i in range(60):
        window = preprocess.inception_crop_window(tf.constant(shape), _key(i)).numpy()
        assert _inside(window, shape), (window, shape)
        y, x, h, w = window
        area = h * w / (shape[0] * shape[1])
        ratio = w / h
        if 0.08 - 0.02 <= area <= 1.0 and 3 / 4 - 0.1 <= ratio <= 4 / 3 + 0.1:
            fitted += 1
    if min(shape) >= 32:  # a real photo: the draws, not the fallback, give the crops
        assert fitted == 60
        sizes = {tuple(preprocess.inception_crop_window(tf.constant(shape), _key(i)).numpy())
                 for i in range(20)}
        assert len(sizes) == 20  # random, not one fixed window


def test_inception_fallback_is_a_centred_clamped_crop():
    # A 3x300 strip: no window of aspect 3/4..4/3 with 8% of the area fits, so the fallback
    # takes the centred window of aspect 4/3 at full height.
    window = preprocess.inception_crop_window(tf.constant((3, 300)), _key(0)).numpy()
    assert tuple(window) == (0, 148, 3, 4)


@pytest.mark.parametrize("shape", SHAPES)
def test_paper_windows_are_the_scale_augmentation(shape):
    shorter = min(shape)
    sides = set()
    for i in range(60):
        window = preprocess.paper_crop_window(tf.constant(shape), _key(i), 224, (256, 480)).numpy()
        assert _inside(window, shape)
        y, x, h, w = window
        assert h == w
        # side = 224 * shorter / S for S in [256, 480]
        low, high = round(224 * shorter / 480), min(shorter, round(224 * shorter / 256))
        assert max(1, low) <= h <= max(1, high)
        sides.add(h)
    if shorter >= 224:
        assert len(sides) > 10


def test_paper_window_covers_scale_range_ends():
    # shorter side 480: S = 480 gives the 224 window, S = 256 gives 420.
    sides = [preprocess.paper_crop_window(tf.constant((480, 640)), _key(i), 224, (256, 480))
             .numpy()[2] for i in range(400)]
    assert min(sides) >= 224 and max(sides) <= 420
    assert min(sides) < 235 and max(sides) > 400


@pytest.mark.parametrize("shape", SHAPES)
def test_center_window_is_centred(shape):
    y, x, h, w = preprocess.center_crop_window(tf.constant(shape), 224, 256).numpy()
    assert _inside((y, x, h, w), shape)
    assert h == w == max(1, min(min(shape), round(min(shape) * 224 / 256)))
    assert abs((shape[0] - h) - 2 * y) <= 1 and abs((shape[1] - w) - 2 * x) <= 1


def test_decode_grey_cmyk_and_png_named_anything():
    grey = preprocess.decode(_jpeg(np.full((9, 7), 100, np.uint8)), "bytes").numpy()
    assert grey.shape == (9, 7, 3) and np.all(grey == grey[..., :1])
    out = io.BytesIO()
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(out, "JPEG")  # red, in ink
    cmyk = preprocess.decode(out.getvalue(), "bytes").numpy()
    assert cmyk.shape == (10, 20, 3)
    assert np.all(np.abs(cmyk.astype(int) - [255, 0, 0]) < 16)
    png = _smooth(11, 13)
    np.testing.assert_array_equal(preprocess.decode(_png(png), "bytes").numpy(), png)
    rgba = np.dstack([png, np.full((11, 13), 255, np.uint8)])
    assert preprocess.decode(_png(rgba), "bytes").numpy().shape == (11, 13, 3)


def test_jpeg_window_decodes_only_the_window_and_equals_the_crop():
    image = _smooth(60, 80)
    data = _jpeg(image, quality=95)
    full = preprocess.decode(data, "bytes").numpy()
    window = tf.constant([5, 9, 30, 41])
    part = preprocess.decode_window(data, "bytes", lambda shape: window).numpy()
    # Equal but for chroma upsampling at the window's edge.
    diff = np.abs(part.astype(int) - full[5:35, 9:50].astype(int))
    assert part.shape == (30, 41, 3) and diff.max() <= 8 and diff.mean() < 0.1
    # The window function sees the image's shape from the header.
    seen = []
    preprocess.decode_window(data, "bytes", lambda shape: seen.append(shape) or window)
    assert tuple(tf.get_static_value(seen[0])[:2]) == (60, 80)
    png_part = preprocess.decode_window(_png(image), "bytes", lambda shape: window).numpy()
    np.testing.assert_array_equal(png_part, image[5:35, 9:50])


@pytest.mark.parametrize("name", preprocess.TRAIN_PREPROCESS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_preprocessing_shapes_dtypes_ranges(name, dtype):
    s = _settings(train_preprocess=name, dtype=dtype, mean=(100, 110, 120), std=(50, 60, 70),
                  scale_range=(26, 40))
    fn = preprocess.train_fn(s, "bytes")
    low = (0 - np.array(s.mean)) / np.array(s.std)
    high = (255 - np.array(s.mean)) / np.array(s.std)
    for i, (h, w) in enumerate([(37, 50), (24, 24), (50, 30)]):
        out = fn(_jpeg(_smooth(h, w, i)), _key(i))
        assert out.shape == (24, 24, 3) and out.dtype == preprocess.DTYPES[dtype]
        values = out.numpy().astype(np.float32)
        assert np.all(values >= low - 0.02) and np.all(values <= high + 0.02)
        if name == "cifar":  # some draws shift the image into its zero padding
            pass
        elif name == "none":  # no randomness
            np.testing.assert_array_equal(values, fn(_jpeg(_smooth(h, w, i)), _key(99)).numpy()
                                          .astype(np.float32))


def test_cifar_is_pad_crop_flip_of_the_normalised_image():
    s = _settings(train_preprocess="cifar", image_size=8, mean=(10, 10, 10), std=(2, 2, 2))
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    norm = (image.astype(np.float32) - 10) / 2
    padded = np.pad(norm, ((4, 4), (4, 4), (0, 0)))
    fn = preprocess.train_fn(s, "pixels")
    seen = set()
    for i in range(80):
        out = fn(tf.constant(image), _key(i)).numpy()
        matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                   if np.array_equal(out, (padded[dy:dy + 8, dx:dx + 8])[:, ::-1 if f else 1])]
        assert matches, i
        seen.update(matches)
    assert len({m[2] for m in seen}) == 2 and len({m[:2] for m in seen}) > 20


def test_train_preprocessing_is_keyed():
    s = _settings(train_preprocess="inception")
    fn = preprocess.train_fn(s, "bytes")
    data = _jpeg(_smooth(50, 70))
    a, b, c = fn(data, _key(1)), fn(data, _key(1)), fn(data, _key(2))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


def test_pca_lighting_shifts_each_image_by_one_colour():
    image = tf.constant(np.full((30, 30, 3), 128, np.uint8))
    plain = preprocess.train_fn(_settings(train_preprocess="paper", scale_range=(24, 30)), "pixels")
    lit = preprocess.train_fn(_settings(train_preprocess="paper", scale_range=(24, 30),
                                        pca_lighting=0.1), "pixels")
    shifts = []
    for i in range(20):
        diff = lit(image, _key(i)).numpy() - plain(image, _key(i)).numpy()
        np.testing.assert_allclose(diff, np.broadcast_to(diff[0, 0], diff.shape), atol=1e-3)
        shifts.append(diff[0, 0])
    shifts = np.array(shifts)
    assert 0.5 < np.abs(shifts).max() < 40 and np.std(shifts[:, 0]) > 0.1


@pytest.mark.parametrize("name", ["center", "ten_crop", "none"])
def test_eval_preprocessing_shapes(name):
    s = _settings(eval_preprocess=name, dtype="bfloat16", resize_size=28)
    fn = preprocess.eval_fn(s, "bytes")
    out = fn(_jpeg(_smooth(40, 55)))
    assert out.shape == ((10, 24, 24, 3) if name == "ten_crop" else (24, 24, 3))
    assert out.dtype == tf.bfloat16
    values = out.numpy().astype(np.float32)
    assert values.min() >= -0.5 and values.max() <= 255.5


def test_center_equals_resize_then_centre_crop():
    image = _smooth(64, 96)
    s = _settings(eval_preprocess="center", image_size=28, resize_size=32)
    out = preprocess.eval_fn(s, "pixels")(tf.constant(image)).numpy()
    # Reference: shorter side 64 -> 32 (96 -> 48), centre 28x28.
    resized = tf.image.resize(image, (32, 48), antialias=True).numpy()
    reference = resized[2:30, 10:38]
    assert np.abs(out - reference).mean() < 3.0


def test_ten_crop_is_corners_centre_and_flips():
    image = tf.constant(np.arange(6 * 8 * 3, dtype=np.float32).reshape(6, 8, 3))
    crops = preprocess.ten_crops(image, 4).numpy()
    ref = image.numpy()
    np.testing.assert_array_equal(crops[0], ref[:4, :4])
    np.testing.assert_array_equal(crops[1], ref[:4, 4:])
    np.testing.assert_array_equal(crops[2], ref[2:, :4])
    np.testing.assert_array_equal(crops[3], ref[2:, 4:])
    np.testing.assert_array_equal(crops[4], ref[1:5, 2:6])
    np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])


@pytest.mark.parametrize("field,value,allowed", [
    ("train_preprocess", "alexnet", "inception"),
    ("eval_preprocess", "full", "ten_crop"),
    ("dtype", "float16", "bfloat16"),
    ("resize_method", "lanczos7", "bilinear"),
])
def test_bad_values_name_field_value_and_choices(field, value, allowed):
    with pytest.raises(ValueError) as info:
        preprocess.settings(_config(**{field: value}))
    message = str(info.value)
    assert f"data.{field}" in message and repr(value) in message and allowed in message
    assert "\n" not in message


def test_pixel_mean_goes_with_every_preprocessing_normalised_on_the_host():
    for train, evaluation in (("paper", "center"), ("inception", "ten_crop"),
                              ("paper", "multi_scale"), ("cifar", "none")):
        preprocess.settings(_config(subtract_pixel_mean=True, train_preprocess=train,
                                    eval_preprocess=evaluation, dtype="float32"))
    with pytest.raises(ValueError, match="subtract_pixel_mean.*float32"):
        preprocess.settings(_config(subtract_pixel_mean=True, dtype="uint8"))


# ---- multi-scale testing (Sec. 3.4) ----------------------------------------------------------


@pytest.mark.parametrize("shape,aspect,at_224", [
    ((375, 500), 5, (224, 299)),    # 4:3 -> 2^(5/12) = 1.335
    ((500, 375), -5, (299, 224)),   # portrait
    ((333, 500), 7, (224, 336)),    # 3:2 -> 2^(7/12) = 1.498
    ((10, 10), 0, (224, 224)),
    ((100, 181), 10, (224, 399)),   # 16:9 -> 2^(10/12) = 1.782
    ((100, 300), 12, (224, 448)),   # beyond 2:1: squeezed to 2:1
    ((300, 40), -12, (448, 224)),
])
def test_aspect_classes_round_the_ratio_on_a_log_scale(shape, aspect, at_224):
    assert int(preprocess.aspect_class(*shape)) == aspect
    assert preprocess.class_shape(aspect, 224) == at_224


def test_aspect_rounding_moves_no_ratio_up_to_two_by_more_than_three_percent():
    ratios = np.linspace(1, 2, 1001)
    classes = [int(preprocess.aspect_class(1000, round(1000 * r))) for r in ratios]
    rounded = np.array([2 ** (k / preprocess.ASPECT_STEPS) for k in classes])
    assert np.abs(rounded / ratios - 1).max() < 0.03


@pytest.mark.parametrize("pixel_mean", [False, True])
def test_multi_scale_views_are_the_whole_image_at_each_scale(pixel_mean):
    image = _smooth(30, 41)  # 41 / 30 = 1.37: class 5 (1.335)
    mean = np.random.default_rng(1).uniform(0, 255, (12, 12, 3)).astype(np.float32)
    s = _settings(image_size=12, eval_preprocess="multi_scale", eval_scales=(8, 12, 20),
                  mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0), dtype="float32")
    aspect, views = preprocess.multi_scale_fn(s, "bytes", mean if pixel_mean else None)(_png(image))
    assert int(aspect) == 5 and len(views) == 3
    for scale, view in zip((8, 12, 20), views):
        size = (scale, round(scale * 2 ** (5 / 12)))
        expected = tf.image.resize(image, size).numpy()
        expected -= tf.image.resize(mean, size).numpy() if pixel_mean else np.float32((10, 20, 30))
        np.testing.assert_allclose(view.numpy(), expected / np.float32((2, 4, 8)), atol=1e-4)


def test_multi_scale_views_as_pixels_for_the_devices():
    s = _settings(image_size=12, eval_preprocess="multi_scale", eval_scales=(9,), dtype="uint8")
    _, (view,) = preprocess.multi_scale_fn(s, "pixels")(tf.constant(_smooth(40, 20)))
    assert view.dtype == tf.uint8 and view.shape == (18, 9, 3)


def test_multi_scale_batch_sizes_hold_the_inputs_at_every_shape():
    s = _settings(image_size=16, eval_preprocess="multi_scale", eval_scales=(12, 16, 24))
    sizes = preprocess.multi_scale_batch_sizes(s, 64, 2)
    assert len(sizes) == 25 and sizes == sizes[::-1] and all(b % 2 == 0 for b in sizes)
    costs = [preprocess.multi_scale_inputs(s, k) for k in range(-12, 13)]
    # A square: 2 flips x (144 + 256 + 576) pixels / 256 = 7.6 inputs, 8 images in 64 inputs.
    assert costs[12] == pytest.approx(7.625) and sizes[12] == 8
    for b, cost in zip(sizes, costs):  # within the budget, but for rounding up to the devices
        assert (b - 1) * cost <= 64 < (b + 1) * cost or b == 2
    assert preprocess.multi_scale_batch_sizes(s, 1, 8) == (8,) * 25  # one image per device at least


@pytest.mark.parametrize("value", [(), (224, 0), (224.0,), "224", (True,)])
def test_bad_eval_scales_name_the_field(value):
    with pytest.raises(ValueError) as info:
        preprocess.settings(_config(eval_scales=value))
    assert "data.eval_scales" in str(info.value) and "\n" not in str(info.value)


def test_eval_fn_sends_multi_scale_to_its_own_function():
    with pytest.raises(ValueError, match="multi_scale_fn"):
        preprocess.eval_fn(_settings(eval_preprocess="multi_scale"), "pixels")
