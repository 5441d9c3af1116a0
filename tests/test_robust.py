"""Runs that survive: kills, preemption, corrupt checkpoints, bad configs, NaNs, failed saves."""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags as absl_flags
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import train_step as train_step_harness
from resnet_jax.cli import flags as cli_flags
from resnet_jax.data import pipeline
from resnet_jax.run import checkpoint, validate
from resnet_jax.training import loop, losses, steps, writers
from runs import REPO, assert_trees_close, environment, latest_params, main_command, run_main, small_config

LONG = {"train.num_steps": 40, "checkpoint.every_steps": 5, "eval.every_steps": 20}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    run_main(workdir, **LONG)
    return workdir


def start_and_signal(workdir, sig):
    """Starts the real command and sends `sig` once its first checkpoint (after step 1) is on disk."""
    process = subprocess.Popen(main_command(workdir, **LONG), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    checkpoints = workdir / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 5 for p in checkpoints.iterdir())):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def train_steps(workdir):
    return [row["step"] for row in map(json.loads, open(workdir / "metrics.jsonl")) if "train_loss" in row]


@pytest.mark.slow
def test_sigkill_then_restart_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    code, _ = start_and_signal(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert latest_params(tmp_path)[0] < 40  # killed before the end
    restart = run_main(tmp_path, **LONG)
    assert train_steps(tmp_path) == list(range(1, 41))  # no duplicate or missing step
    assert_trees_close(latest_params(tmp_path)[1], latest_params(uninterrupted)[1], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_saves_says_so_and_exits_with_its_status(tmp_path, uninterrupted, sig, status):
    code, stderr = start_and_signal(tmp_path, sig)
    assert code == status, stderr[-3000:]
    stopped = latest_params(tmp_path)[0]
    # Said once, in the last line (the log file has it too).
    assert stderr.rstrip().splitlines()[-1] == (
        f"resnet_jax: stopped at step {stopped} and saved it; the same command resumes"), stderr
    assert "Stopped by a signal" not in stderr and stopped < 40
    assert f"Stopped by a signal: saved the checkpoint of step {stopped}" in \
        (tmp_path / "log.txt").read_text()
    run_main(tmp_path, **LONG)
    assert_trees_close(latest_params(tmp_path)[1], latest_params(uninterrupted)[1], rtol=0, atol=0)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_named_and_the_one_before_restored(tmp_path, uninterrupted, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    latest = workdir / "checkpoints" / "40"
    for root, _, files in os.walk(latest):
        for name in files:
            if name != "_CHECKPOINT_METADATA":
                open(os.path.join(root, name), "wb").close()  # truncated to nothing
    # A save cut short leaves only a temporary directory, which is never taken for a checkpoint.
    (workdir / "checkpoints" / "45.orbax-checkpoint-tmp").mkdir()
    config = small_config(**{**LONG, "train.num_steps": 45})
    state = loop.train_and_evaluate(config, str(workdir), allow_config_change=True)
    assert "checkpoint of step 40" in caplog.text and "is corrupt" in caplog.text
    assert (workdir / "corrupt_checkpoints" / "40").exists()
    assert int(state.step) == 45
    assert train_steps(workdir) == list(range(1, 46))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["one bit", "eight bytes"])
def test_a_changed_byte_in_the_newest_checkpoint_is_named_and_the_one_before_resumed(tmp_path, uninterrupted, how):
    # Issue 24, failure 2: one byte xor 1 (or eight bytes of 0xff) in the newest step's largest
    # data file was restored without a word, and the run ended with other arrays.
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    files = [os.path.join(root, name) for root, _, names in os.walk(workdir / "checkpoints" / "40")
             for name in names]
    largest = max(files, key=os.path.getsize)
    data = bytearray(open(largest, "rb").read())
    if how == "one bit":
        data[len(data) // 2] ^= 1
    else:
        data[len(data) // 2:len(data) // 2 + 8] = b"\xff" * 8
    open(largest, "wb").write(data)
    step, silent = checkpoint.read_latest(workdir)  # orbax alone reads it without an error
    assert step == 40 and any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(silent), jax.tree.leaves(checkpoint.read_latest(uninterrupted)[1])))
    stderr = run_main(workdir, **LONG).stderr
    [line] = [line for line in stderr.splitlines() if "is corrupt" in line]
    assert "checkpoint of step 40" in line and "has checksum" in line, line
    assert "Restored the checkpoint of step 35" in stderr
    assert (workdir / "corrupt_checkpoints" / "40").exists()
    assert train_steps(workdir) == list(range(1, 41))
    assert_trees_close(latest_params(workdir)[1], latest_params(uninterrupted)[1], rtol=0, atol=0)


@pytest.mark.slow
def test_a_workdir_with_no_restorable_checkpoint_is_refused_until_restart(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:  # every data file of every checkpoint truncated to nothing
        for root, _, files in os.walk(workdir / "checkpoints" / str(step) / "default"):
            for name in files:
                if not name.startswith("_"):
                    open(os.path.join(root, name), "wb").close()
    rows = (workdir / "metrics.jsonl").read_text()
    refused = subprocess.run(main_command(workdir, **LONG), cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("resnet_jax: error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-3000:]
    # Not printed in pieces through that line: tensorstore's late reads into orbax's closed loop.
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "no checkpoint in" in errors[0] and "--restart" in errors[0], errors
    assert all(f"step {step}:" in errors[0] for step in steps), errors
    assert (workdir / "metrics.jsonl").read_text() == rows  # nothing written, nothing moved
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == steps
    run_main(workdir, "--restart", **LONG)
    assert train_steps(workdir) == list(range(1, 41))  # from step 0, each row once
    assert sorted(p.name for p in (workdir / "corrupt_checkpoints").iterdir()) == sorted(map(str, steps))
    assert_trees_close(latest_params(workdir)[1], latest_params(uninterrupted)[1], rtol=0, atol=0)


BAD_CONFIGS = [
    (["--config.model.name=resnet42"], "ImageNet depth must be one of"),
    (["--config.model.name=cifar_resnet21"], "6n\\+2"),
    (["--config.model.shortcut=D"], "shortcut must be one of 'A', 'B', 'C'; got 'D'"),
    (["--config.train.batch_size=60"], "train.batch_size must be a positive multiple of the device count 8"),
    (["--config.schedule.base_lr=0"], "schedule.base_lr must be a positive number; got 0"),
    (["--config.schedule.name=linear"], "schedule.name must be one of"),
    (["--config.data.train_preprocess=random"], "data.train_preprocess='random' is not one of"),
    (["--config.model.name=resnet18", "--config.data.image_size=16"], "data.image_size must be >= 32"),
    (["--config.data.num_classes=100"], "data.num_classes=100 but data set 'digits' has 10"),
    (["--config.train.batchsize=64"], "config field 'train.batchsize' does not exist"),
    (["--config.train.batch_size=many"], "--config.train.batch_size=many"),
    (["--config=configs/cifar.py:depth=20,widht=2"], "takes depth, plain, shortcut, val"),
]


@pytest.mark.slow
def test_bad_configs_fail_in_one_line_before_writing(tmp_path):
    eight = environment(devices=8)
    runs = []
    for i, (flags, _) in enumerate(BAD_CONFIGS):
        workdir = tmp_path / str(i)
        command = [c for c in main_command(workdir) if not c.startswith("--config=")] + flags
        if not any(f.startswith("--config=") for f in flags):
            command.insert(3, "--config=configs/quickstart.py")
        runs.append((workdir, subprocess.Popen(command, cwd=REPO, env=eight, stderr=subprocess.PIPE,
                                               stdout=subprocess.DEVNULL, text=True)))
    for (flags, message), (workdir, process) in zip(BAD_CONFIGS, runs):
        _, stderr = process.communicate(timeout=300)
        errors = [line for line in stderr.splitlines() if line.startswith("resnet_jax: error:")]
        assert process.returncode == 2 and len(errors) == 1, (flags, stderr[-2000:])
        assert re.search(message, errors[0]), (flags, errors)
        assert "Traceback" not in stderr
        assert not workdir.exists() or not any(workdir.iterdir()), flags


@pytest.mark.slow
def test_unwritable_workdir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run(main_command(blocker / "run"), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "resnet_jax: error: workdir" in result.stderr and "is not writable" in result.stderr


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_unless_allowed(tmp_path):
    loop.train_and_evaluate(small_config(), str(tmp_path))
    with pytest.raises(validate.SetupError, match=r"different config \(seed: 0 -> 3\).*--allow_config_change"):
        loop.setup(small_config(seed=3), str(tmp_path))
    loop.setup(small_config(seed=3), str(tmp_path), allow_config_change=True)
    # Where compiled programs go changes no result: a run resumes with the cache moved, or with a
    # config.json of a field since removed (compiled_step_dir: restarts rely on JAX's cache).
    loop.setup(small_config(compilation_cache_dir=""), str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["compiled_step_dir"] = "{workdir}/compiled_step"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loop.setup(small_config(), str(tmp_path))


def poisoned(monkeypatch, at_step, field, value):
    real = pipeline.train_iterator

    def iterator(*args, **kwargs):
        for step, batch in enumerate(real(*args, **kwargs), kwargs["start_step"] + 1):
            if step == at_step:
                batch = {**batch, field: np.full_like(batch[field], value)}
            yield batch

    monkeypatch.setattr(pipeline, "train_iterator", iterator)


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poisoned(monkeypatch, 5, "image", np.nan)
    # Float images on the host: uint8 pixels cannot be poisoned with NaN.
    config = small_config(**{"train.num_steps": 8, "checkpoint.every_steps": 2,
                             "data.dtype": "float32"})
    # ReLU turns NaN into 0 on this backend, so the loss may stay finite while a gradient does not.
    with pytest.raises(loop.TrainingError, match=r"^step 5: non-finite (loss|gradient of [\w.]+); "
                       r"stopped, the checkpoint of step 4 is kept"):
        loop.train_and_evaluate(config, str(tmp_path))
    step, params = latest_params(tmp_path)
    assert step == 4
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


@pytest.mark.slow
def test_non_finite_steps_can_be_skipped_and_counted(tmp_path, monkeypatch):
    poisoned(monkeypatch, 3, "image", np.inf)
    config = small_config(**{"train.skip_nonfinite": True, "data.dtype": "float32"})
    state = loop.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert int(state.step) == 6
    assert rows[-1]["skipped_steps"] == 1 and "skipped_steps" not in rows[1]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(latest_params(tmp_path)[1]))


def test_labels_out_of_range_stop_the_run(tmp_path, monkeypatch):
    poisoned(monkeypatch, 2, "label", 10)
    with pytest.raises(loop.TrainingError, match=r"^step 2: a label is outside \[0, num_classes\)"):
        loop.train_and_evaluate(small_config(), str(tmp_path))


def test_a_failed_save_names_the_intact_checkpoint(tmp_path, monkeypatch):
    real_save = checkpoint.ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", save)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"^saving the checkpoint of step 3 failed \(.*No space left on device\); the latest complete checkpoint, of step 2, is intact"):
        loop.train_and_evaluate(small_config(**{"checkpoint.every_steps": 1}), str(tmp_path))
    assert latest_params(tmp_path)[0] == 2


@pytest.mark.parametrize("full", ["checkpoint", "metrics"])
def test_a_full_disk_ends_in_one_line_naming_what_is_left(tmp_path, monkeypatch, full):
    # The disk fills in the background save of step 3 (before any checkpoint is complete) or in
    # the metrics row of step 5 (after step 3's checkpoint). Injected: no small file system can
    # be made here without root.
    if full == "checkpoint":
        def finalize(self, directory):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(checkpoint.ocp.StandardCheckpointHandler, "finalize", finalize)
        expected = (r"^saving the checkpoint of step 3 failed \(\[Errno 28\] No space left on device\); "
                    r"no checkpoint is complete: none was written to ")
    else:
        write = writers.JsonlWriter.write_scalars

        def write_scalars(self, step, scalars):
            if step == 5:
                raise OSError(28, "No space left on device")
            write(self, step, scalars)

        monkeypatch.setattr(writers.JsonlWriter, "write_scalars", write_scalars)
        expected = (r"^writing the metrics of step 5 failed \(OSError: \[Errno 28\] No space left on "
                    r"device\); the latest complete checkpoint, of step 3, is intact in ")
    with pytest.raises((checkpoint.CheckpointError, loop.TrainingError), match=expected) as raised:
        loop.train_and_evaluate(small_config(), str(tmp_path))
    assert "\n" not in str(raised.value)
    left = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert not any("tmp" in name for name in left), left


FIELDS = ["seed", "model.name", "model.shortcut", "model.width", "model.bn_group_size", "model.dtype",
          "data.image_size", "data.train_preprocess", "data.eval_preprocess", "data.name",
          "train.batch_size", "train.num_steps", "schedule.name", "schedule.base_lr",
          "optimizer.momentum", "optimizer.weight_decay_mode", "eval.batch_size", "checkpoint.keep",
          "log_every_steps", "model.nonexistent", "trian.batch_size", "data"]
VALUES = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.sampled_from(["resnet18", "cifar_plain8", "bfloat16", "B", "True"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.one_of(st.sampled_from(FIELDS), st.text("abcdefgh_.", min_size=1, max_size=12)), value=VALUES)
def test_random_overrides_give_a_clear_error_or_a_valid_setup(tmp_path, capsys, field, value):
    """The command line's parse and every setup check: never a traceback, one line or a run."""
    argv = ["main", "--config=configs/quickstart.py", f"--config.{field}={value}"]
    flag_values = absl_flags.FlagValues()
    capsys.readouterr()
    try:
        base, _ = cli_flags.load("configs/quickstart.py")
        cli_flags.parse(cli_flags.define_config(argv, base, "", flag_values), flag_values)
        config = flag_values.config
        config.to_dict()
    except SystemExit as exit_:
        message = capsys.readouterr().err
        assert exit_.code == 2 and message.startswith("resnet_jax: error: ") and message.count("\n") == 1
        return
    os.chdir(REPO)
    try:
        loop.setup(config, str(tmp_path / "run"), allow_config_change=True)
    except validate.SetupError as error:
        assert str(error) and "\n" not in str(error)


def test_a_checkpoint_of_another_model_is_refused_not_set_aside(tmp_path):
    loop.train_and_evaluate(small_config(), str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint of step 6 .* other shapes"):
        loop.train_and_evaluate(small_config(**{"model.width": 8}), str(tmp_path), allow_config_change=True)
    assert latest_params(tmp_path)[0] == 6 and not (tmp_path / "corrupt_checkpoints").exists()


@pytest.mark.parametrize("index, name", [(0, "a"), (2, "a"), (3, "b.c"), (6, "b.c"), (7, "d"),
                                         (8, "k"), (31, "k")])
def test_the_first_non_finite_gradient_element_names_its_parameter(index, name):
    params = {"a": np.zeros(3), "b": {"c": np.zeros((2, 2))}, "d": np.zeros(1), "k": np.zeros((1, 3, 4, 2))}
    names = loop._parameter_names(params)
    assert names == [("a", 3), ("b.c", 7), ("d", 8), ("k", 32)]
    health = {"labels": True, "loss": True, "gradients": index}
    with pytest.raises(loop.TrainingError, match=rf"^step 9: non-finite gradient of {name};"):
        loop._check_health([(9, health)], names, skip_nonfinite=False, last_saved=8)
    loop._check_health([(9, {**health, "gradients": -1})], names, False, 8)  # all finite


class _SqrtAtZero(nnx.Module):
    """Two logits, the loss finite; the gradients of `b` and of the kernel `k`, where `zero_in`
    names them, are infinite at their zero elements."""

    def __init__(self, zero_in: str):
        self.a = nnx.Param(jnp.ones((3,)))
        self.b = nnx.Param(jnp.asarray([1.0, 0.0 if "b" in zero_in else 1.0]))
        zeros = (jnp.asarray([0, 0]), jnp.asarray([0, 0]), jnp.asarray([2, 0]), jnp.asarray([0, 1]))
        self.k = nnx.Param(jnp.ones((1, 1, 3, 2)).at[zeros].set(0.0 if "k" in zero_in else 1.0))

    def __call__(self, x):
        return ((x[:, :3] * self.a[...]).sum(-1, keepdims=True) + jnp.sqrt(self.b[...])
                + jnp.sqrt(self.k[...]).sum((0, 1, 2)))


def _sqrt_at_zero_step(zero_in: str):
    """The train step's arguments for `_SqrtAtZero(zero_in)` with plain SGD: (graphdef, tx,
    schedule, params, state, batch)."""
    graphdef, params, model_state = nnx.split(_SqrtAtZero(zero_in), nnx.Param, nnx.BatchStat)
    schedule = optax.constant_schedule(0.1)
    tx = optax.sgd(schedule)
    state = train_step_harness._initial_state(params, model_state, tx)
    batch = {"image": jnp.ones((2, 3)), "label": jnp.asarray([0, 1])}
    return graphdef, tx, schedule, params, state, batch


# b's second element; k's zeros [0, 0, 2, 0] and [0, 0, 0, 1] are its elements 4 and 1 in
# row-major order (2 and 3 in column-major or with the channels swapped): the first is 1.
@pytest.mark.parametrize("zero_in, index, name", [("b", 3 + 1, "b"), ("k", 3 + 2 + 1, "k"),
                                                  ("bk", 3 + 1, "b")])
def test_the_train_step_reports_the_first_non_finite_gradient_element(zero_in, index, name):
    graphdef, tx, schedule, params, state, batch = _sqrt_at_zero_step(zero_in)
    _, health = steps.train_step(graphdef, tx, schedule, losses.Loss(), False, state, batch)
    assert bool(health["loss"]) and int(health["gradients"]) == index
    names = loop._parameter_names(params)
    with pytest.raises(loop.TrainingError, match=rf"non-finite gradient of {name};"):
        loop._check_health([(1, jax.device_get(health))], names, False, None)


def test_the_gradients_are_checked_in_one_operation_whatever_their_number():
    # One check of all the leaves joined: XLA's CPU backend compiles a kernel for each check, and
    # a check per leaf made 462 more in the unrolled ResNet-152 step. The other check is the
    # loss's. Counted in the step as lowered, before XLA may copy an operation into its users.
    graphdef, tx, schedule, params, state, batch = _sqrt_at_zero_step("b")
    assert len(jax.tree.leaves(params)) == 3
    step = jax.jit(functools.partial(steps.train_step, graphdef, tx, schedule, losses.Loss(), False))
    assert step.lower(state, batch).as_text().count("stablehlo.is_finite") == 2


@pytest.mark.parametrize("field, value, named", [
    ("model.shortcut", "D", "model: shortcut must be one of"),
    ("schedule.name", "cos", "schedule.name must be one of"),
    ("optimizer.momentum", 1.5, "optimizer.momentum must be in [0, 1)"),
    ("model.bn_group_size", 5, "model.bn_group_size=5 must divide"),
])
def test_a_bad_value_is_reported_before_a_missing_data_set(tmp_path, field, value, named):
    # The data set was looked at first: its user fixed the data, then met the config's error.
    config = small_config(**{field: value, "data.name": f"imagefolder:{tmp_path / 'none'}"})
    with pytest.raises(validate.SetupError) as raised:
        loop.setup(config, str(tmp_path / "run"))
    assert str(raised.value).startswith(named), raised.value
