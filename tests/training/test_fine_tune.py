"""model.init_from: a run that starts from torchvision weights with another class count, or
from another run's checkpoint."""

import subprocess

import numpy as np
import pytest
import torch
import torchvision
from etils import epath
from flax import nnx

import runs
from resnet_jax import models
from resnet_jax.run import checkpoint
from resnet_jax.training import fine_tune, loop, steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 3 steps (its weights no longer the initial ones) to start from."""
    workdir = tmp_path_factory.mktemp("trained")
    loop.train_and_evaluate(runs.small_config(**{"train.num_steps": 3}), str(workdir))
    return workdir


def saved_weights(workdir):
    _, state = checkpoint.read_latest(str(workdir))
    return steps.with_weights(models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0)),
                                        checkpoint.pure(state))


@pytest.mark.slow
def test_a_run_starts_from_another_runs_checkpoint(trained, tmp_path, caplog):
    # A learning rate of 1e-9: the checkpoint after one step holds the loaded weights.
    caplog.set_level("INFO")
    workdir = tmp_path / "run"
    loop.train_and_evaluate(runs.small_config(**{
        "model.init_from": str(trained), "schedule.base_lr": 1e-9, "train.num_steps": 1,
        "eval.every_steps": 1, "checkpoint.every_steps": 1}), str(workdir))
    assert f"Starting from the weights of {trained}; the checkpoint of step 3" in caplog.text
    runs.assert_trees_close(runs.latest_params(workdir)[1], runs.latest_params(trained)[1],
                            rtol=0, atol=1e-6)


@pytest.mark.slow
def test_another_class_count_gets_a_new_classifier_and_keeps_the_rest(trained):
    saved = saved_weights(trained)
    model = models.create("cifar_resnet8", num_classes=4, rngs=nnx.Rngs(1))
    fresh_fc = np.asarray(model.fc.kernel[...])
    changes = fine_tune.start_from(model, epath.Path(trained))
    assert changes == ["the checkpoint of step 3", "the classifier (10 classes in the weights) is "
                       "replaced by a new one of 4 classes"]
    np.testing.assert_array_equal(model.fc.kernel[...], fresh_fc)
    np.testing.assert_array_equal(model.conv1.kernel[...], saved.conv1.kernel[...])
    ours, theirs = (nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)) for m in (model, saved))
    runs.assert_trees_close(ours, theirs, rtol=0, atol=0)  # BN statistics too


@pytest.mark.slow
def test_another_network_is_refused_naming_the_key_and_both_shapes(trained):
    model = models.create("cifar_resnet8", num_classes=10, width=32, rngs=nnx.Rngs(0))
    before = np.asarray(model.conv1.kernel[...])
    with pytest.raises(ValueError, match=r"^'params\.bn1\.bias' has shape \(16,\) in the "
                       r"checkpoint of step 3; this model needs \(32,\)$"):
        fine_tune.start_from(model, epath.Path(trained))
    np.testing.assert_array_equal(model.conv1.kernel[...], before)  # nothing changed
    deeper = models.create("cifar_resnet14", num_classes=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^the checkpoint of step 3 lacks 'params\.stages\."):
        fine_tune.start_from(deeper, epath.Path(trained))


def test_a_directory_that_holds_no_run_is_refused(tmp_path):
    model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"is a directory without checkpoints/: give a \.pth, \.pt "
                       r"or \.safetensors file, or the workdir of a run of this project$"):
        fine_tune.start_from(model, epath.Path(tmp_path))


@pytest.mark.slow
def test_a_run_starts_from_torchvision_weights_with_a_new_classifier(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    workdir = tmp_path / "run"
    # A learning rate of 1e-9: the checkpoint after one step holds the loaded weights.
    result = runs.run_main(workdir, **{
        "model.name": "resnet18", "model.stride_on": "3x3", "model.shortcut": "B",
        "model.width": 64, "data.image_size": 32,
        "model.init_from": str(tmp_path / "resnet18.pth"), "schedule.base_lr": 1e-9,
        "train.num_steps": 1, "eval.every_steps": 1, "checkpoint.every_steps": 1})
    assert "Starting from the weights of" in result.stderr
    assert "the classifier (1000 classes in the weights) is replaced by a new one of 10" in result.stderr
    _, params = runs.latest_params(workdir)
    kernel = params["conv1"]["kernel"]
    kernel = kernel.get("value", kernel) if isinstance(kernel, dict) else kernel  # orbax's layout
    np.testing.assert_allclose(kernel,
                               net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0), atol=1e-6)
    fc = params["fc"]["kernel"]
    assert np.shape(fc.get("value", fc) if isinstance(fc, dict) else fc) == (512, 10)


@pytest.mark.slow
def test_weights_that_do_not_fit_are_refused_in_one_line(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    workdir = tmp_path / "run"
    command = runs.main_command(workdir, **{
        "model.name": "resnet18", "model.stride_on": "3x3", "model.shortcut": "B",
        "model.width": 64, "data.image_size": 32,
        "model.init_from": str(tmp_path / "resnet34.pth")})
    result = subprocess.run(command, cwd=runs.REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("resnet_jax: error:")]
    assert "model.init_from:" in error and "unexpected key 'layer1.2." in error, error
    assert not workdir.exists()


@pytest.mark.slow
def test_the_small_image_fine_tuning_config_trains_torchvision_weights_on_an_image_folder(tmp_path):
    # It took a new user three tries to find the data type and the eval split for this.
    from PIL import Image  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
        for name in ("ant", "bee", "cat"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / split / name / f"{i}.jpg")
    workdir = tmp_path / "run"
    command = [*runs.main_command(workdir)[:3], "--config=fine_tune_small:depth=18",
               f"--workdir={workdir}", f"--config.model.init_from={tmp_path / 'resnet18.pth'}",
               f"--config.data.name=imagefolder:{tmp_path / 'images'}",
               "--config.data.num_classes=3", "--config.train.batch_size=8",
               "--config.train.num_steps=2", "--config.eval.every_steps=2",
               "--config.eval.batch_size=8", "--config.checkpoint.every_steps=2",
               "--config.log_every_steps=1", "--config.compilation_cache_dir="]
    result = subprocess.run(command, cwd=runs.REPO, env=runs.environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replaced by a new one of 3" in result.stderr
    rows = [row for row in (workdir / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in row]
    assert len(rows) == 1
