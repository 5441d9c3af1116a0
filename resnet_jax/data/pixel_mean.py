"""The per-pixel mean image of Sec. 3.4 and 4.2, made once per workdir and the same on every
process."""

import io
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax.data import on_device, pipeline, preprocess
from resnet_jax.run import paths


def load(config: Any, workdir: epath.Path | None) -> None:
    """The per-pixel mean image of Sec. 3.4 ("the per-pixel mean subtracted", from AlexNet) and
    4.2, made once per workdir and the same on every process, for `data` to subtract
    (`pipeline.use_pixel_mean`). Process 0 looks for WORKDIR/pixel_mean_<digest>.npy and broadcasts
    what it finds, so every process takes the same branch and holds the same image; where there
    is none, each process sums its own slice of the training split, the sums are all-gathered and
    combined alike on every process, and process 0 writes the file (whole: `paths.write_bytes`).
    workdir=None: made, and kept nowhere.

    The mean is of the whole training images each resized to image_size x image_size, and is
    subtracted from every crop (train and eval, whatever the preprocessing) and, resized, from
    every multi-scale view. The paper's Caffe models subtract the matching region of a mean image
    of 256 x 256 images instead, which differs from it by the images' borders' share of it.
    """
    if not config.data.get("subtract_pixel_mean", False) or on_device.enabled(config.data):
        return  # data.on_device makes its own (on_device.pixel_mean)
    path = workdir / pipeline.pixel_mean_file(config.data) if workdir else None
    size = preprocess.settings(config.data).image_size
    first = jax.process_index() == 0 and path is not None
    stored = first and path.exists()
    mean = np.load(io.BytesIO(path.read_bytes())) if stored else np.zeros((size, size, 3), np.float32)
    several = jax.process_count() > 1
    if several and bool(multihost_utils.broadcast_one_to_all(np.int32(stored))):
        stored, mean = True, np.asarray(multihost_utils.broadcast_one_to_all(mean))
    if stored:
        logging.info("Per-pixel mean image read from %s", path)
    else:
        total, count = pipeline.pixel_mean_sums(config.data, jax.process_index(), jax.process_count())
        part = np.concatenate([(total / max(count, 1)).ravel(), [count]]).astype(np.float32)
        parts = np.asarray(multihost_utils.process_allgather(part)) if several else part[None]
        counts = parts[:, -1].astype(np.float64)
        mean = (parts[:, :-1].astype(np.float64) * counts[:, None]).sum(0) / max(counts.sum(), 1)
        mean = mean.astype(np.float32).reshape(size, size, 3)
        if first:
            buffer = io.BytesIO()
            np.save(buffer, mean)
            paths.write_bytes(path, buffer.getvalue())
        logging.info("Per-pixel mean image made from %d training images%s", int(counts.sum()),
                     f" (process 0 writes {path})" if path else "")
    pipeline.use_pixel_mean(config.data, mean)
