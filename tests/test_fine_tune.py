"""model.init_from: a run that starts from torchvision weights with another class count."""

import subprocess

import numpy as np
import torch
import torchvision

import runs


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
