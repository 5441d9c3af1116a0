"""Checks that a run can start, made before anything is written to the workdir.

Each failure is one line that names the field, the value and what is allowed.
"""

import json
import math
import os
import socket
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from resnet_jax.run import jsonl
from resnet_jax.run.checkpoint import DIRECTORY as CHECKPOINTS


class SetupError(ValueError):
    """A config or workdir that cannot run; nothing has been written."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise SetupError(f"{field} must be {allowed}; got {value!r}")


def _number(value: Any) -> bool:
    """A finite int or float: inf and nan pass no comparison's intent."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rate(field: str, value: float) -> None:
    """A learning rate float32 (the parameters' dtype) holds as a normal number: a smaller one
    becomes 0 or a subnormal there and trains nothing, without a word."""
    smallest, largest = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
    _require(smallest <= value <= largest, field, value,
             f"between {smallest:.4g} and {largest:.4g}, the normal numbers of float32 (the "
             f"parameters' dtype, in which a smaller rate is 0 or subnormal)")


def check_numbers(config: Any) -> None:
    """The fields that no other part checks: lengths, intervals, rates; all finite."""
    positive_ints = {"log_every_steps": config.log_every_steps, "eval.every_steps": config.eval.every_steps,
                     "checkpoint.every_steps": config.checkpoint.every_steps,
                     "checkpoint.keep": config.checkpoint.keep,
                     "checkpoint.timeout_seconds": config.checkpoint.timeout_seconds}
    for field, value in positive_ints.items():
        _require(_int(value) and value >= 1, field, value, "a positive integer")
    steps = config.train.num_steps
    _require(_int(steps) and (steps > 0 or steps == -1), "train.num_steps", steps,
             "a positive integer, or -1 to train for train.num_epochs")
    if steps == -1:
        _require(_number(config.train.num_epochs) and config.train.num_epochs > 0, "train.num_epochs",
                 config.train.num_epochs, "a positive number (or train.num_steps > 0)")
    s = config.schedule
    _require(_number(s.base_lr) and s.base_lr > 0, "schedule.base_lr", s.base_lr, "a positive number")
    _check_rate("schedule.base_lr", s.base_lr)
    _require(_int(s.warmup_steps) and s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps,
             "an integer >= 0")
    until = s.warmup_until_error
    _require(_number(until) and 0 <= until <= 1, "schedule.warmup_until_error", until,
             "in [0, 1]: the training error below which the warm-up ends (Sec. 4.2: 0.8), or 0 "
             "for none")
    if until:
        # One warm-up or the other: a fixed length, or until the training error is below it.
        _require(s.warmup_steps == 0, "schedule.warmup_steps", s.warmup_steps,
                 f"0 with schedule.warmup_until_error={until!r} (set one of the two to 0)")
        _require(s.name == "paper_cifar", "schedule.name", s.name,
                 f"'paper_cifar' with schedule.warmup_until_error={until!r} (Sec. 4.2's warm-up)")
        # train_step scales the update, which is the step at warmup_lr where the rate is applied
        # last (sgd); LARS applies it before momentum.
        _require(config.optimizer.name == "sgd", "optimizer.name", config.optimizer.name,
                 f"'sgd' with schedule.warmup_until_error={until!r}")
    if s.warmup_steps or until:
        _require(_number(s.warmup_lr) and s.warmup_lr > 0, "schedule.warmup_lr", s.warmup_lr,
                 "a positive number")
        _check_rate("schedule.warmup_lr", s.warmup_lr)
    _require(_number(s.warmup_epochs) and s.warmup_epochs >= 0, "schedule.warmup_epochs",
             s.warmup_epochs, "a number >= 0")
    _require(_number(s.end_lr) and s.end_lr >= 0, "schedule.end_lr", s.end_lr, "a number >= 0")
    for field in ("boundaries_epochs", "boundaries_steps"):
        values = tuple(s[field])
        _require(all(_number(v) and v >= 0 for v in values), f"schedule.{field}", values,
                 "numbers >= 0")
    o = config.optimizer
    _require(_number(o.momentum) and 0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "in [0, 1)")
    _require(_number(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay",
             o.weight_decay, "a number >= 0")
    _require(_number(o.lars_trust_coefficient) and o.lars_trust_coefficient > 0,
             "optimizer.lars_trust_coefficient", o.lars_trust_coefficient, "a positive number")
    _require(_number(o.lars_eps) and o.lars_eps >= 0, "optimizer.lars_eps", o.lars_eps, "a number >= 0")
    betas = tuple(o.lamb_betas)
    _require(len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas), "optimizer.lamb_betas",
             betas, "two numbers in [0, 1)")
    _require(_number(o.lamb_eps) and o.lamb_eps >= 0, "optimizer.lamb_eps", o.lamb_eps, "a number >= 0")
    _require(_number(o.lamb_max_grad_norm) and o.lamb_max_grad_norm >= 0, "optimizer.lamb_max_grad_norm",
             o.lamb_max_grad_norm, "a number >= 0 (0: no clipping)")
    # LARS and LAMB take one trust ratio per parameter array; a scanned stage stacks its blocks'
    # kernels in one, which would give them one ratio together.
    _require(o.name not in ("lars", "lamb") or not config.model.get("scan_blocks", False),
             "model.scan_blocks", config.model.get("scan_blocks"),
             f"False with optimizer.name={o.name!r} (one trust ratio per layer)")
    t = config.train
    _require(_number(t.label_smoothing) and 0 <= t.label_smoothing < 1, "train.label_smoothing",
             t.label_smoothing, "in [0, 1)")
    threshold = t.bce_target_threshold
    _require(threshold is None or (_number(threshold) and 0 <= threshold < 1),
             "train.bce_target_threshold", threshold, "None or in [0, 1) (ResNet strikes back: 0.2)")
    for field in ("mixup_alpha", "cutmix_alpha"):
        _require(_number(t[field]) and t[field] >= 0, f"train.{field}", t[field], "a number >= 0 (0: off)")
    for field in ("mix_prob", "mix_switch_prob"):
        _require(_number(t[field]) and 0 <= t[field] <= 1, f"train.{field}", t[field], "in [0, 1]")
    _require(_number(t.ema_decay) and 0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay,
             "in [0, 1) (0: no average; torchvision: 0.99998)")
    _require(_int(t.ema_every_steps) and t.ema_every_steps >= 1, "train.ema_every_steps",
             t.ema_every_steps, "a positive integer")
    _require(isinstance(t.ema_adjust, bool), "train.ema_adjust", t.ema_adjust, "True or False")


def check_bn_groups(group: Any, batch_size: int, devices: int) -> None:
    """Ghost BN (model.bn_group_size) normalises each group on its own device, with no
    collective: every device's part of the batch must hold whole groups. train.batch_size must
    already divide by the device count."""
    if group is None:
        return
    _require(_int(group) and group >= 1, "model.bn_group_size", group, "a positive integer or unset")
    per_device = batch_size // devices
    if per_device % group == 0:
        return
    where = f"{devices} device{'s' if devices > 1 else ''}"
    counts = (f"train on a device count dividing {batch_size // group} (the batch's groups), "
              if batch_size % group == 0 else "")
    raise SetupError(
        f"model.bn_group_size={group} must divide the per-device batch {per_device} "
        f"(train.batch_size {batch_size} on {where}), since each device normalises whole groups "
        f"of its own: {counts}set --config.model.bn_group_size to a divisor of {per_device}, or "
        f"take BN over the whole batch with the config's argument bn=global "
        f"(--config=resnet50:bn=global, --config=cifar:bn=global)")


def check_image_size(image_size: int, total_stride: int, model_name: str) -> None:
    """The image must cover the network's total stride, so that its last maps are not all padding."""
    _require(image_size >= total_stride, "data.image_size", image_size,
             f">= {total_stride}, the total stride of {model_name}")


def dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves of nested dicts (a config's, a checkpoint's) by dotted path: {"a.0.b": leaf}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in dotted(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


# Where compiled programs and TensorBoard events go: no result depends on them, so a run resumes
# whatever they are (and a run begun before a field was added, or after one was removed, resumes).
NOT_COMPARED = ("compilation_cache_dir", "tensorboard_dir", "compiled_step_dir")


def check_workdir(workdir: epath.Path, config_json: str, allow_config_change: bool) -> None:
    """The workdir's layout is intact (`check_layout`), it is writable, and it holds no run of
    another config (unless allowed)."""
    before = check_layout(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe.{os.getpid()}.{socket.gethostname()}"
        probe.write_text("ok")
        probe.unlink()
    except Exception as error:  # OSError locally; a bucket's client raises its own kinds
        raise SetupError(f"workdir {str(workdir)!r} is not writable: {one_line(error)}") from None
    if allow_config_change or before is None:
        return
    before = dotted(before)
    if "compiled_step_dir" in before:
        logging.info("This workdir's config names compiled_step_dir, no longer used: restarts "
                     "rely on JAX's persistent compilation cache (compilation_cache_dir).")
    now = dotted(json.loads(config_json))
    # Fields added to the configs since that run (data.on_device, say) hold this version's
    # defaults, of which the old run knew nothing: not a change.
    added = sorted(now.keys() - before.keys())
    if added:
        logging.info("Fields new since this workdir's run, taken at their values: %s", ", ".join(added))
    changed = sorted(k for k in before.keys()
                     if before.get(k) != now.get(k) and k not in NOT_COMPARED)
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise SetupError(f"workdir {str(workdir)!r} holds a run with a different config ({shown}"
                         f"{', ...' if len(changed) > 5 else ''}); use another --workdir, or pass "
                         f"--allow_config_change to resume it with the new config")


def check_layout(workdir: epath.Path) -> dict | None:
    """Reads the workdir, writing nothing: its checkpoints/ a listable directory, every line of
    metrics.jsonl a row (the file is written whole, so a bad line is corruption, the last one
    too), config.json a readable JSON object, which it returns (None where there is none).
    Warns where a resume loses rows: checkpoints without metrics.jsonl, or rows without a
    checkpoint (the run starts from step 0 and replaces them). Every process checks alike."""
    steps = _steps(workdir / CHECKPOINTS)
    rows = _rows(workdir / jsonl.JSONL)
    if steps and rows is None:
        logging.warning("%s holds checkpoints up to step %d but there is no %s: the rows up to step "
                        "%d are gone, and only the rows after the checkpoint restored will be "
                        "written", workdir / CHECKPOINTS, max(steps), jsonl.JSONL, max(steps))
    if rows and not steps:
        logging.warning("%s holds %d row%s but %s holds no checkpoint: the run starts from step 0 "
                        "and replaces those rows", workdir / jsonl.JSONL, len(rows),
                        "s" if len(rows) > 1 else "", workdir / CHECKPOINTS)
    return _saved_config(workdir / "config.json")


def _steps(directory: epath.Path) -> list[int]:
    """The steps saved in `directory` (orbax names each step's directory by its number)."""
    try:
        if not directory.exists():
            return []
        if not directory.is_dir():
            raise SetupError(f"{directory} is not a directory, where the run keeps its checkpoints: "
                             f"move it away to resume (the run then starts from step 0)")
        return [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
    except OSError as error:
        raise SetupError(f"{directory} cannot be listed: {one_line(error)}") from None


def _rows(path: epath.Path) -> list[dict] | None:
    """The rows of metrics.jsonl, None if there is none."""
    try:
        if not path.exists():
            return None
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise SetupError(f"{path} cannot be read: {one_line(error)}") from None
    try:
        return jsonl.parse(text.splitlines(), path)
    except ValueError as error:
        raise SetupError(f"{one_line(error)}; mend or delete that line to resume") from None


def _saved_config(path: epath.Path) -> dict | None:
    """The config of the workdir's run, None if it has none."""
    try:
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError) as error:  # unreadable, or cut short
        raise SetupError(f"{path}, the config of this workdir's run, is not a readable JSON object: "
                         f"{one_line(error)}; restore it, or delete it to resume with this "
                         f"command's config") from None
    return saved
