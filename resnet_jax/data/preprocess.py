"""Image preprocessing for the tf.data pipelines of `pipeline.py`.

Every function here works on one example inside `tf.data.Dataset.map` and is deterministic given
its key: random choices use stateless ops keyed by an int64 pair that `pipeline.py` derives from
(seed, process, position in the stream), so crops and flips do not depend on tf.data's parallelism
and a restarted run redraws exactly what an uninterrupted run drew.

Records reach this module undecoded where the source allows it: `"bytes"` records are encoded
images (JPEG, or PNG whatever the file name says), `"path"` records name such a file, `"pixels"`
records are uint8 HxWx3 arrays.
JPEG crops decode only the crop window (`tf.image.decode_and_crop_jpeg`).

Train: `inception` (random-resized crop), `paper` (He et al. Sec. 3.4: shorter side to a random
length in `scale_range`, random crop, flip, optional PCA lighting), `cifar` (Sec. 4.2: 4-pixel zero
padding, random crop, flip), `none`. Eval: `center`, `ten_crop` (Sec. 3.4's 10-crop testing),
`multi_scale` (Sec. 3.4's fully convolutional multi-scale testing, `multi_scale_fn`), `none`. All end normalised, `(x - mean) / std` in 0-255 units, in the configured dtype; or, with
`dtype="uint8"`, as the rounded pixels, normalised on the devices by `device_inputs.normaliser` (a
quarter of the bytes to make, batch and copy to the devices; about 1.5x the images per second on
two cores, benchmarks/README.md). PCA lighting then travels beside the pixels as a per-image RGB
offset (`lighting_offset`) that the devices add before normalising, as the host would have;
bicubic's overshoot beyond 0-255 is clipped, as PIL's is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from resnet_jax.data import sources

try:
    import tensorflow as tf
except ModuleNotFoundError as error:  # data.on_device=True needs only `settings` (on_device.py)
    if error.name != "tensorflow":
        raise
    tf = None

TRAIN_PREPROCESS = ("inception", "paper", "cifar", "none")
EVAL_PREPROCESS = ("center", "ten_crop", "multi_scale", "none")
MANY_VIEWS = ("ten_crop", "multi_scale")  # several views of each eval image, not one
# "uint8": pixels, normalised on the devices (`device_inputs.normaliser`).
DTYPES = ({"float32": tf.float32, "bfloat16": tf.bfloat16, "uint8": tf.uint8} if tf is not None
          else dict.fromkeys(("float32", "bfloat16", "uint8")))
# data.on_device=True: what the train step can do to the images it gathers (on_device.py).
ON_DEVICE_TRAIN_PREPROCESS = ("cifar", "none")
RESIZE_METHODS = ("bilinear", "bicubic", "area", "nearest")

# torchvision's ImageNet statistics, in 0-255 units: the default when a config gives none.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# The "standard colour augmentation" of Krizhevsky et al. (2012) that Sec. 3.4 cites: the
# principal components of ImageNet's RGB pixels (fb.resnet.torch's values, for pixels in 0-1;
# scaled to 0-255 where applied).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

# Sec. 3.4: "the images are resized such that the shorter side is in {224, 256, 384, 480, 640}".
EVAL_SCALES = (224, 256, 384, 480, 640)
# Multi-scale testing batches images of one shape. Each image's aspect ratio (longer over shorter
# side) is rounded on a log scale to twelve steps per doubling, 2^(k/12) for k = 0..12: every
# ratio from 1:1 to 2:1 moves by at most 2.9% (4:3 and 3:2, the commonest in ImageNet, by 0.1%;
# 5:4 by 0.8%), and, portrait or landscape, there are 25 shapes at each scale, so at most 25
# compiled programs. Ratios beyond 2:1 are squeezed to 2:1.
ASPECT_STEPS = 12
MAX_ASPECT_STEP = 12  # 2^(12/12) = 2:1

# The inception crop's ranges (Szegedy et al. 2015, as torchvision's RandomResizedCrop).
INCEPTION_AREA = (0.08, 1.0)
INCEPTION_ASPECT = (3 / 4, 4 / 3)
INCEPTION_ATTEMPTS = 10


def _choice(field, value, allowed):
    if value not in allowed:
        raise ValueError(f"data.{field}={value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """The preprocessing fields of a `data` config, checked, with their defaults filled in."""

    image_size: int
    train_preprocess: str
    eval_preprocess: str
    resize_size: int
    scale_range: tuple[int, int]
    pca_lighting: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    subtract_pixel_mean: bool
    dtype: str
    cifar_padding: int
    resize_method: str
    antialias: bool
    eval_scales: tuple[int, ...] = EVAL_SCALES  # multi_scale: the shorter sides tested
    # data.on_device: the train split decoded once into device memory, each step's batch
    # gathered and augmented inside the jitted step (on_device.py). Not `on_device` below.
    in_device_memory: bool = False

    @property
    def tf_dtype(self):
        return DTYPES[self.dtype]

    @property
    def lighting(self) -> bool:
        """The train images get PCA lighting: pca_lighting > 0, any train preprocessing but `none`."""
        return self.pca_lighting > 0 and self.train_preprocess != "none"

    @property
    def on_device(self) -> bool:
        """Normalised on the devices: the pipeline ends in rounded uint8 pixels."""
        return self.dtype == "uint8"


def settings(config) -> Settings:
    """Reads and checks the preprocessing fields of `config` (a run config's `data` section)."""
    image_size = int(sources.get(config, "image_size", sources.IMAGE_SIZE))
    if image_size < 1:
        raise ValueError(f"data.image_size={image_size} must be a positive int")
    train = _choice("train_preprocess", sources.get(config, "train_preprocess", "inception"),
                    TRAIN_PREPROCESS)
    evaluation = _choice("eval_preprocess", sources.get(config, "eval_preprocess", "center"),
                         EVAL_PREPROCESS)
    resize_size = int(sources.get(config, "resize_size", round(image_size / 0.875)))
    if resize_size < image_size:
        raise ValueError(f"data.resize_size={resize_size} must be >= data.image_size={image_size}")
    scale_range = tuple(int(s) for s in sources.get(config, "scale_range", (256, 480)))
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"data.scale_range={scale_range} must be (low, high) with 0 < low <= high")
    mean = tuple(float(m) for m in sources.get(config, "mean", IMAGENET_MEAN))
    std = tuple(float(s) for s in sources.get(config, "std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"data.mean={mean} and data.std={std} must be 3 values each, std > 0")
    subtract_pixel_mean = bool(sources.get(config, "subtract_pixel_mean", False))
    eval_scales = sources.get(config, "eval_scales", EVAL_SCALES)
    if (not isinstance(eval_scales, (tuple, list)) or not eval_scales
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in eval_scales)):
        raise ValueError(f"data.eval_scales={eval_scales!r} must be a tuple of positive ints "
                         f"(shorter sides in pixels, e.g. {EVAL_SCALES})")
    dtype = _choice("dtype", sources.get(config, "dtype", "float32"), tuple(DTYPES))
    in_device_memory = bool(sources.get(config, "on_device", False))
    resize_method = _choice("resize_method", sources.get(config, "resize_method", "bilinear"),
                            RESIZE_METHODS)
    antialias = bool(sources.get(config, "antialias", False))
    pca_lighting = float(sources.get(config, "pca_lighting", 0.0))
    if in_device_memory:
        if (train not in ON_DEVICE_TRAIN_PREPROCESS or evaluation != "none"
                or resize_method != "bilinear" or antialias or (pca_lighting and train != "none")):
            raise ValueError(
                "data.on_device=True needs train_preprocess 'cifar' or 'none', "
                "eval_preprocess 'none', resize_method 'bilinear', antialias False and "
                f"pca_lighting 0; got {train!r}, {evaluation!r}, {resize_method!r}, {antialias}, "
                f"{pca_lighting} (data.on_device=False takes the others)")
    elif dtype == "uint8" and (train == "cifar" or subtract_pixel_mean):
        raise ValueError(
            "data.dtype='uint8' (pixels normalised on the devices) does not go with "
            "train_preprocess='cifar' or subtract_pixel_mean=True (zero padding and the pixel mean "
            "belong to the normalised image): use data.dtype 'float32' or 'bfloat16'")
    return Settings(
        image_size=image_size,
        train_preprocess=train,
        eval_preprocess=evaluation,
        resize_size=resize_size,
        scale_range=scale_range,
        pca_lighting=pca_lighting,
        mean=mean,
        std=std,
        subtract_pixel_mean=subtract_pixel_mean,
        dtype=dtype,
        cifar_padding=int(sources.get(config, "cifar_padding", 4)),
        resize_method=resize_method,
        antialias=antialias,
        eval_scales=tuple(eval_scales),
        in_device_memory=in_device_memory,
    )


def output_shape(s: Settings, train: bool) -> tuple[int, ...]:
    image = (s.image_size, s.image_size, 3)
    return image if train or s.eval_preprocess != "ten_crop" else (10, *image)


# ---- keys and random draws ----------------------------------------------------------------------


def fold(key, data) -> tf.Tensor:
    """A new int64 key from `key` and an integer: independent streams for independent choices."""
    return tf.cast(tf.random.experimental.stateless_fold_in(
        tf.cast(key, tf.int64), tf.cast(data, tf.int64)), tf.int64)


def _uniform(key, shape=()):
    return tf.random.stateless_uniform(shape, seed=key, dtype=tf.float32)


def _randint(key, low, high):
    """Uniform int32 in [low, high] (inclusive), low and high int32 scalars with low <= high."""
    u = _uniform(key)
    span = tf.cast(high - low + 1, tf.float32)
    return low + tf.minimum(tf.cast(tf.floor(u * span), tf.int32), high - low)


# ---- crop windows: (y, x, height, width) in pixels of the decoded image ------------------------


def inception_crop_window(shape, key, area_range=INCEPTION_AREA, aspect_range=INCEPTION_ASPECT,
                          attempts=INCEPTION_ATTEMPTS) -> tf.Tensor:
    """Random-resized crop: area a fraction in `area_range` of the image, aspect ratio (w/h)
  log-uniform in `aspect_range`; the first of `attempts` draws that fits, else the centre crop
  of the largest window with a clamped aspect ratio (torchvision's fallback). int32 [y, x, h, w].
  """
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    u = _uniform(key, (attempts, 4))
    target = h * w * (area_range[0] + (area_range[1] - area_range[0]) * u[:, 0])
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    ratio = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    cw = tf.round(tf.sqrt(target * ratio))
    ch = tf.round(tf.sqrt(target / ratio))
    fits = (cw <= w) & (ch <= h) & (cw >= 1) & (ch >= 1)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    # Fallback: the whole image with its aspect ratio clamped into range, centred.
    in_ratio = w / h
    fw = tf.where(in_ratio > aspect_range[1], tf.round(h * aspect_range[1]), w)
    fh = tf.where(in_ratio < aspect_range[0], tf.round(w / aspect_range[0]), h)
    found = tf.reduce_any(fits)
    ch = tf.where(found, ch[first], tf.maximum(fh, 1.0))
    cw = tf.where(found, cw[first], tf.maximum(fw, 1.0))
    y = tf.where(found, tf.floor(u[first, 2] * (h - ch + 1)), tf.floor((h - ch) / 2))
    x = tf.where(found, tf.floor(u[first, 3] * (w - cw + 1)), tf.floor((w - cw) / 2))
    y = tf.minimum(y, h - ch)
    x = tf.minimum(x, w - cw)
    return tf.cast(tf.stack([y, x, ch, cw]), tf.int32)


def paper_crop_window(shape, key, image_size, scale_range) -> tf.Tensor:
    """Sec. 3.4: shorter side resized to S uniform in `scale_range`, then a random
  image_size x image_size crop. Resizing commutes with cropping, so this returns the crop's window
  in the original image, a square of side round(image_size * shorter / S), and only that window is
  decoded and resized (equal to resize-then-crop up to rounding the window to whole pixels).
  """
    h, w = tf.cast(shape[0], tf.int32), tf.cast(shape[1], tf.int32)
    shorter = tf.minimum(h, w)
    scale = _randint(fold(key, 0), scale_range[0], scale_range[1])
    side = tf.cast(tf.round(image_size * tf.cast(shorter, tf.float32) / tf.cast(scale, tf.float32)),
                   tf.int32)
    side = tf.clip_by_value(side, 1, shorter)
    y = _randint(fold(key, 1), 0, h - side)
    x = _randint(fold(key, 2), 0, w - side)
    return tf.stack([y, x, side, side])


def center_crop_window(shape, image_size, resize_size) -> tf.Tensor:
    """The centre crop that resizing the shorter side to resize_size and cropping image_size
  takes, as a window of the original image (so only the window is decoded)."""
    h, w = tf.cast(shape[0], tf.int32), tf.cast(shape[1], tf.int32)
    shorter = tf.cast(tf.minimum(h, w), tf.float32)
    side = tf.cast(tf.round(shorter * image_size / resize_size), tf.int32)
    side = tf.clip_by_value(side, 1, tf.minimum(h, w))
    return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


# ---- decoding -----------------------------------------------------------------------------------


def decode(record, kind: str) -> tf.Tensor:
    """The whole image as uint8 HxWx3: grey, CMYK and PNG (whatever the file name) included."""
    if kind == "path":
        record, kind = tf.io.read_file(record), "bytes"
    if kind == "pixels":
        return record
    image = tf.io.decode_image(record, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_window(record, kind: str, window_fn: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """Decodes only the window `window_fn(shape)` chooses: of a JPEG, without decoding the rest."""
    if kind == "path":
        record, kind = tf.io.read_file(record), "bytes"
    if kind == "pixels":
        return _crop(record, window_fn(tf.shape(record)))

    def jpeg():
        window = window_fn(tf.image.extract_jpeg_shape(record))
        return tf.image.decode_and_crop_jpeg(record, window, channels=3)

    def other():
        image = decode(record, kind)
        return _crop(image, window_fn(tf.shape(image)))

    image = tf.cond(tf.io.is_jpeg(record), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def _crop(image, window):
    return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]


# ---- the preprocessings -------------------------------------------------------------------------


def _resize(image, size, s: Settings):
    # float32 whatever the method ("nearest" would keep uint8).
    return tf.cast(tf.image.resize(image, size, method=s.resize_method, antialias=s.antialias),
                   tf.float32)


def _resize_square(image, s: Settings):
    """To image_size x image_size (a no-op when it is that size already)."""
    shape = tf.shape(image)
    same = (shape[0] == s.image_size) & (shape[1] == s.image_size)
    return tf.cond(same, lambda: tf.cast(image, tf.float32),
                   lambda: _resize(image, (s.image_size, s.image_size), s))


def _flip(image, key):
    return tf.cond(_uniform(key) < 0.5, lambda: tf.reverse(image, axis=[-2]), lambda: image)


def lighting_offset(s: Settings, key) -> tf.Tensor:
    """AlexNet's colour augmentation, the RGB offset eigvec @ (alpha * eigval) with alpha ~
    N(0, pca_lighting), in 0-255 units, of the example with train key `key`."""
    alpha = tf.random.stateless_normal((3,), seed=fold(key, 1), stddev=s.pca_lighting)
    return tf.linalg.matvec(tf.constant(PCA_EIGVEC), alpha * tf.constant(PCA_EIGVAL)) * 255.0


def _pixels(image, s: Settings):
    """The rounded uint8 pixels, for dtype uint8 (normalised on the devices)."""
    if s.resize_method == "bicubic":  # may overshoot 0-255
        return tf.saturate_cast(tf.round(image), tf.uint8)
    # Bilinear, area and nearest stay within the pixels' range: adding 0.5 and truncating
    # rounds, in one pass fewer (5% more images per second for `inception`, two runs each).
    return tf.cast(image + 0.5, tf.uint8)


def _finish(image, s: Settings, pixel_mean):
    """Normalised, in the configured dtype; for dtype uint8 the pixels, rounded."""
    if s.on_device:
        return _pixels(image, s)
    # Constants of the image's full shape: TensorFlow broadcasts a 3-vector over HxWx3 about ten
    # times slower than it subtracts two arrays of one shape (1.3 ms of 3 per ImageNet image).
    full = (s.image_size, s.image_size, 3)
    mean = pixel_mean if pixel_mean is not None else np.broadcast_to(np.float32(s.mean), full)
    scale = np.broadcast_to(np.float32(1.0) / np.float32(s.std), full)
    image = (tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)) * tf.constant(scale)
    return tf.cast(image, s.tf_dtype)


def train_fn(s: Settings, kind: str, pixel_mean=None):
    """`fn(record, key) -> image` of the configured train preprocessing."""
    size = s.image_size
    name = s.train_preprocess

    def fn(record, key):
        if name == "inception":
            image = decode_window(record, kind,
                                  lambda shape: inception_crop_window(shape, fold(key, 0)))
            image = _resize(image, (size, size), s)
        elif name == "paper":
            image = decode_window(
                record, kind,
                lambda shape: paper_crop_window(shape, fold(key, 0), size, s.scale_range))
            image = _resize(image, (size, size), s)
        else:  # cifar, none: the whole image at image_size x image_size
            image = _resize_square(decode(record, kind), s)
        if s.lighting and not s.on_device:
            image = image + lighting_offset(s, key)
        image = _finish(image, s, pixel_mean)
        if name == "cifar":
            # Zero padding after normalisation: the padded pixels are the mean (Sec. 4.2's "4 pixels
            # are padded on each side" as fb.resnet.torch does it).
            p = s.cifar_padding
            image = tf.pad(image, [[p, p], [p, p], [0, 0]])
            dy = _randint(fold(key, 3), 0, 2 * p)
            dx = _randint(fold(key, 4), 0, 2 * p)
            image = image[dy:dy + size, dx:dx + size]
        if name != "none":
            image = _flip(image, fold(key, 2))
        return tf.ensure_shape(image, (size, size, 3))

    return fn


def ten_crops(image, size):
    """The four corner crops and the centre crop, then their flips: (10, size, size, C)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
               ((h - size) // 2, (w - size) // 2)]
    crops = tf.stack([image[y:y + size, x:x + size] for y, x in corners])
    return tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)


def eval_fn(s: Settings, kind: str, pixel_mean=None):
    """`fn(record) -> image` of the configured eval preprocessing."""
    size = s.image_size
    name = s.eval_preprocess

    if name == "multi_scale":
        raise ValueError("data.eval_preprocess='multi_scale' makes views of several sizes: "
                         "preprocess.multi_scale_fn")

    def fn(record):
        if name == "center":
            image = decode_window(record, kind,
                                  lambda shape: center_crop_window(shape, size, s.resize_size))
            image = _resize(image, (size, size), s)
        elif name == "ten_crop":
            image = decode(record, kind)
            shape = tf.cast(tf.shape(image)[:2], tf.float32)
            new = tf.cast(tf.round(shape * s.resize_size / tf.reduce_min(shape)), tf.int32)
            image = ten_crops(_resize(image, tf.maximum(new, size), s), size)
        else:
            image = _resize_square(decode(record, kind), s)
        return tf.ensure_shape(_finish(image, s, pixel_mean), output_shape(s, train=False))

    return fn


def aspect_class(height, width) -> tf.Tensor:
    """The shape class of an image for multi-scale testing, int32: the steps of its aspect ratio
    (`ASPECT_STEPS` per doubling, at most `MAX_ASPECT_STEP`), negative when it is taller than wide."""
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    steps = tf.round(ASPECT_STEPS * tf.math.log(tf.maximum(h, w) / tf.minimum(h, w)) / math.log(2.0))
    steps = tf.minimum(tf.cast(steps, tf.int32), MAX_ASPECT_STEP)
    return tf.where(h > w, -steps, steps)


def class_shape(aspect: int, scale: int) -> tuple[int, int]:
    """(height, width) of the shape class `aspect` at `scale`: the shorter side `scale`, the longer
    side scale * 2^(|aspect| / ASPECT_STEPS), rounded."""
    longer = round(scale * 2 ** (abs(aspect) / ASPECT_STEPS))
    return (longer, scale) if aspect < 0 else (scale, longer)


def multi_scale_inputs(s: Settings, aspect: int) -> float:
    """What one image of shape class `aspect` costs a multi-scale eval step, in network inputs of
    image_size^2 pixels: its view and the view's flip at every scale."""
    return sum(2 * math.prod(class_shape(aspect, scale)) for scale in s.eval_scales) / s.image_size ** 2


def multi_scale_batch_sizes(s: Settings, inputs: float, multiple: int) -> tuple[int, ...]:
    """Images per multi-scale batch of each shape class (index aspect + MAX_ASPECT_STEP): as many
    as `inputs` network inputs of image_size^2 hold, at least one, rounded up to a multiple of
    `multiple` (the devices). Each class is a program of its own, so each has its own size: a step
    holds about as many pixels whatever the images' shape."""
    sizes = []
    for aspect in range(-MAX_ASPECT_STEP, MAX_ASPECT_STEP + 1):
        images = max(1, math.floor(inputs / multi_scale_inputs(s, aspect)))
        sizes.append(-(-images // multiple) * multiple)
    return tuple(sizes)


def multi_scale_fn(s: Settings, kind: str, pixel_mean=None):
    """`fn(record) -> (shape class, views)`: Sec. 3.4's multi-scale testing on the host side. The
    whole image, resized so that its shorter side is each of `eval_scales` in turn and its aspect
    ratio is its shape class's (`aspect_class`, `class_shape`), one view per scale; the eval step
    adds each view's horizontal flip and averages the softmax over them all. The network sees the
    whole image (global average pooling makes it fully convolutional), so views of one shape
    class batch together. Normalised as the other modes; the per-pixel mean (an image_size
    square) is resized to each view.

    Differs from the paper in the aspect-ratio rounding alone (at most 2.9% up to 2:1, `ASPECT_STEPS`).
    """
    # The longer side of each class at each scale, from `class_shape`, so that the graph and the
    # Python side round alike.
    longer = {scale: tf.constant([class_shape(k, scale)[1] for k in range(MAX_ASPECT_STEP + 1)])
              for scale in s.eval_scales}

    def fn(record):
        image = decode(record, kind)
        aspect = aspect_class(tf.shape(image)[0], tf.shape(image)[1])
        views = []
        for scale in s.eval_scales:
            side = tf.gather(longer[scale], tf.abs(aspect))
            size = tf.where(aspect < 0, tf.stack([side, scale]), tf.stack([scale, side]))
            view = _resize(image, size, s)
            if s.on_device:
                view = _pixels(view, s)
            else:
                mean = tf.constant(np.float32(s.mean)) if pixel_mean is None else _resize(
                    tf.constant(pixel_mean, tf.float32), size, s)
                scale_ = tf.constant(np.float32(1.0) / np.float32(s.std))
                view = tf.cast((view - mean) * scale_, s.tf_dtype)
            views.append(tf.ensure_shape(view, (None, None, 3)))
        return aspect, tuple(views)

    return fn


def mean_image_fn(s: Settings, kind: str):
    """`fn(record) -> float32 image`, image_size square, unnormalised: for the pixel mean."""
    return lambda record: _resize_square(decode(record, kind), s)

