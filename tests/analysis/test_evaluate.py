"""python -m resnet_jax.evaluate: a run's checkpoints and torchvision weights, evaluated alone."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import runs
from configs import quickstart
from resnet_jax.analysis import layer_responses
from resnet_jax.run import jsonl

pytestmark = pytest.mark.slow  # every test here takes seconds: none is in the fast tier

EVALUATE = [sys.executable, "-m", "resnet_jax.evaluate"]


def _evaluate(*flags, expect=0):
    result = subprocess.run([*EVALUATE, *flags], cwd=runs.REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.fixture
def run(finished_run):
    return finished_run


def _evals(workdir):
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("eval_")}
            for row in jsonl.read_rows(workdir) if "eval_accuracy" in row}


def _files(workdir):
    return {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}


@pytest.mark.parametrize("which", ["latest", "3", "best"])
def test_a_checkpoint_gives_the_runs_own_eval_exactly_and_writes_nothing(run, tmp_path, which):
    before = _files(run)
    out = tmp_path / "scores.json"
    result = _evaluate(f"--workdir={run}", f"--checkpoint={which}", f"--json={out}")
    evals = _evals(run)
    step = {"latest": 6, "3": 3,
            "best": max(evals, key=lambda s: (evals[s]["eval_accuracy"], -s))}[which]
    scores = json.loads(out.read_text())
    assert scores == {"step": step, **evals[step]}
    [line] = result.stdout.splitlines()
    assert line.startswith("eval_loss=") and f"eval_accuracy={evals[step]['eval_accuracy']:.6g}" in line
    assert f"step {step}" in line
    assert _files(run) == before


def test_another_protocol_and_split_from_the_command_line(run):
    scores = {}
    for flags in ([], ["--config.data.eval_preprocess=multi_scale", "--config.data.eval_scales=(8, 12)"],
                  ["--config.data.eval_split=train[:64]"]):
        line = _evaluate(f"--workdir={run}", *flags).stdout.strip()
        scores[tuple(flags)] = line.split("  [")[0]
        assert ("multi_scale" in line) == bool(flags and "multi" in flags[0]), line
    assert len(set(scores.values())) == 3, scores  # each a different evaluation


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint=4"], "--checkpoint=4: "),  # a step number, of no saved step
    (["--checkpoint=4"], "holds no checkpoint of step 4; it holds steps "),
    (["--checkpoint=newest"], "got 'newest'"),
    (["--config.data.eval_preprocess=five_crop"], "data.eval_preprocess='five_crop' is not one of"),
    (["--config.data.evalsplit=test"], "config field 'data.evalsplit' does not exist"),
    (["--weights=x.pth", "--checkpoint=3"], "--weights and --checkpoint"),
    (["--weights=x.pth", "--average"], "--average is a checkpoint's moving average"),
])
def test_bad_input_is_one_line_and_exit_2(run, flags, message):
    before = _files(run)
    result = _evaluate(f"--workdir={run}", *flags, expect=2)
    [error] = [line for line in result.stderr.splitlines() if line.startswith("resnet_jax: error:")]
    assert message in error, error
    assert _files(run) == before


def test_a_workdir_without_a_run_is_refused(tmp_path):
    result = _evaluate(f"--workdir={tmp_path / 'none'}", expect=2)
    assert "no run was started in" in result.stderr.splitlines()[-1]


def test_a_corrupt_checkpoint_is_named_not_evaluated(run, tmp_path):
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    files = [p for p in (workdir / "checkpoints" / "6").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 1
    largest.write_bytes(bytes(data))
    error = _evaluate(f"--workdir={workdir}", expect=2).stderr.splitlines()[-1]
    assert error.startswith("resnet_jax: error:") and "has checksum" in error, error


def test_torchvision_weights_score_as_torchvision_does(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    changes = {"model.name": "resnet18", "model.stride_on": "3x3", "model.shortcut": "B",
               "model.width": 64, "data.image_size": 32}
    result = _evaluate("--config=quickstart", f"--weights={tmp_path / 'resnet18.pth'}",
                       f"--json={tmp_path / 'scores.json'}",
                       *(f"--config.{k}={v}" for k, v in changes.items()))
    assert "resnet18.pth" in result.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    # The same images through torchvision's network, in PyTorch.
    config = quickstart.get_config()
    config.model.name, config.data.image_size = "resnet18", 32
    images, labels = layer_responses.eval_images(config, 10_000)
    with torch.no_grad():
        logits = net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()
    assert scores["step"] is None
    assert abs(scores["eval_accuracy"] - (logits.argmax(-1) == labels).mean()) <= 1 / len(labels)
    log_softmax = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
    assert scores["eval_loss"] == pytest.approx(-log_softmax[np.arange(len(labels)), labels].mean(),
                                                rel=1e-4)
