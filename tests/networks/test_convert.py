"""torchvision <-> resnet_jax weights: equal logits, exact round trip, named errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

from resnet_jax import convert, models


def torchvision_net(name: str, seed: int = 0) -> torch.nn.Module:
    """A torchvision network (e.g. "resnet18", "vgg16_bn") with random weights and non-trivial
    BN parameters and statistics."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.0)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(1.0, 2.0)
    return net


@pytest.fixture(scope="module", params=[18, 50])
def networks(request):
    net = torchvision_net(f"resnet{request.param}")
    model = models.create(f"resnet{request.param}", num_classes=1000, rngs=nnx.Rngs(1),
                          stride_on="3x3", shortcut="B")
    return net, model, {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture
def pair(networks):
    """The two networks with the same weights, whatever an earlier test's train step changed."""
    net, model, state = networks
    net.load_state_dict(state)
    convert.from_torchvision(model, state)
    return net, model


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size", [(224, 224), (193, 225)])
def test_logits_equal_torchvision(pair, mode, size):
    net, model = pair
    getattr(net, mode)()
    getattr(model, mode)()
    images = np.random.RandomState(0).randn(2, *size, 3).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(model(jnp.asarray(images)))
    assert np.abs(expected).max() > 0.5  # the logits are not trivially small
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # A train step moves the running statistics alike (torch's momentum 0.1 is our 0.9).
    ours, theirs = convert.to_torchvision(model), net.state_dict()
    for key in theirs:
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(ours[key], theirs[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


def test_round_trip_is_exact():
    state = torchvision_net("resnet18", seed=3).state_dict()
    model = models.create("resnet18", num_classes=1000, rngs=nnx.Rngs(0), stride_on="3x3")
    convert.from_torchvision(model, {k: v.numpy() for k, v in state.items()})  # numpy works too
    back = convert.to_torchvision(model)
    assert set(back) == set(state)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    fresh = torchvision.models.resnet18()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_bad_state_dicts_are_named():
    state = dict(torchvision_net("resnet18").state_dict())
    model = models.create("resnet18", num_classes=1000, rngs=nnx.Rngs(0), stride_on="3x3")
    before = np.asarray(model.conv1.kernel[...]).copy()
    missing = {k: v for k, v in state.items() if k != "layer2.0.downsample.0.weight"}
    with pytest.raises(ValueError, match=r"lacks 'layer2\.0\.downsample\.0\.weight'"):
        convert.from_torchvision(model, missing)
    with pytest.raises(ValueError, match=r"unexpected key 'layer5\.0\.conv1\.weight'"):
        convert.from_torchvision(model, {**state, "layer5.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'fc\.weight' has shape \(10, 512\).*\(1000, 512\)"):
        convert.from_torchvision(model, {**state, "fc.weight": torch.zeros(10, 512)})
    np.testing.assert_array_equal(np.asarray(model.conv1.kernel[...]), before)  # nothing half-loaded


@pytest.mark.parametrize("overrides, message", [
    ({"stride_on": "1x1"}, "stride_on='3x3'"),
    ({"stride_on": "3x3", "shortcut": "A"}, "shortcut='B'"),
    ({"stride_on": "3x3", "shortcut": "C"}, "shortcut='B'"),
])
def test_incompatible_models_are_refused(overrides, message):
    model = models.create("resnet50", num_classes=1000, rngs=nnx.Rngs(0), **overrides)
    with pytest.raises(ValueError, match=message):
        convert.to_torchvision(model)


@pytest.mark.slow
def test_train_mode_gradients_equal_torchvision():
    # Differentiating through BN in train mode (one reduction per BN forward and backward,
    # resnet_jax/layers.py) against torch's own BatchNorm2d backward, through all of ResNet-18.
    net = torchvision_net("resnet18", seed=5).train()
    model = models.create("resnet18", num_classes=1000, rngs=nnx.Rngs(0), stride_on="3x3")
    convert.from_torchvision(model, net.state_dict())
    model.train()
    rng = np.random.RandomState(1)
    images = rng.randn(4, 64, 64, 3).astype(np.float32)
    weights = rng.randn(4, 1000).astype(np.float32)  # the loss: a fixed mix of the logits
    (torch.from_numpy(weights) * net(torch.from_numpy(images.transpose(0, 3, 1, 2)))).sum().backward()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return (jnp.asarray(weights) * nnx.merge(graphdef, params, rest, copy=True)(images)).sum()

    gradients = nnx.merge(graphdef, nnx.grad(loss)(params), rest)
    ours = convert.to_torchvision(gradients)  # the gradients in torch's names and layouts
    for key, parameter in net.named_parameters():
        theirs = parameter.grad.numpy()
        np.testing.assert_allclose(ours[key], theirs, rtol=0, atol=1e-4 * np.abs(theirs).max() + 1e-7,
                                   err_msg=key)


def test_fine_tuning_from_another_class_count_and_a_ddp_prefix(tmp_path):
    net = torchvision_net("resnet18", seed=2)
    state = {f"module.{key}": value for key, value in net.state_dict().items()}
    torch.save(state, tmp_path / "weights.pth")
    model = models.create("resnet18", num_classes=10, rngs=nnx.Rngs(0), stride_on="3x3")
    fresh = np.asarray(model.fc.kernel[...]).copy()
    changes = convert.from_torchvision(model, convert.read_weights(str(tmp_path / "weights.pth")),
                                       fine_tune=True)
    assert len(changes) == 2 and "module." in changes[0] and "1000 classes" in changes[1]
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), fresh)  # a new classifier
    np.testing.assert_array_equal(np.asarray(model.conv1.kernel[...]),
                                  net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(convert.to_torchvision(model)["layer4.1.bn2.running_mean"],
                                  net.layer4[1].bn2.running_mean.numpy())
    # Anything else that does not fit is still named, with both shapes; nothing is loaded.
    bad = {**net.state_dict(), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv1\.weight' has shape \(64, 64, 1, 1\).*"
                                         r"\(64, 64, 3, 3\)"):
        convert.from_torchvision(model, bad, fine_tune=True)
    with pytest.raises(ValueError, match=r"lacks 'layer2\.0\.conv1\.weight'"):
        convert.from_torchvision(model, {k: v for k, v in net.state_dict().items()
                                         if k != "layer2.0.conv1.weight"}, fine_tune=True)
    with pytest.raises(ValueError, match=r"\.pth, \.pt or \.safetensors"):
        convert.read_weights(str(tmp_path / "weights.npz"))
