"""The report on small runs made here: table, curves, layer responses and the lesion study."""

import csv
import io
import json
import subprocess
import sys

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from resnet_jax import analysis, flops, metrics, models, report
import runs


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    made = []
    for name in ("cifar_plain8", "cifar_resnet8"):
        workdir = base / name
        runs.run_main(workdir, **{"model.name": name})
        made.append(str(workdir))
    return made


def _report(*args):
    """The report's command line, in this process (each new process would import TF and JAX again)."""
    return report.main(list(args))


def _assert_png(path):
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something is drawn


def test_table_has_a_row_per_run_with_its_numbers(workdirs, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "resnet_jax.report", "table", *workdirs, "--csv", str(tmp_path / "t.csv"),
         "--markdown", str(tmp_path / "t.md")], cwd=runs.REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert [r["model"] for r in rows] == ["plain-8", "ResNet-8"]
    for row, workdir, name in zip(rows, workdirs, ("cifar_plain8", "cifar_resnet8")):
        evals = [r for r in metrics.read_rows(workdir) if "eval_accuracy" in r]
        assert float(row["final_error"]) == pytest.approx(100 * (1 - evals[-1]["eval_accuracy"]))
        assert float(row["best_error"]) == pytest.approx(min(100 * (1 - r["eval_accuracy"]) for r in evals))
        model = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
        assert int(row["parameters"]) == flops.count_params(model)
        assert int(row["multiply_adds"]) == flops.count_macs(model, 8)
        assert int(row["steps"]) == runs.SMALL["train.num_steps"]
        assert float(row["images_per_second"]) > 0
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert len(lines) == 4 and "plain-8" in lines[2] and "ResNet-8" in lines[3]


def test_paper_errors_and_names():
    assert report.paper_error("cifar_resnet56", "A") == 6.97
    assert report.paper_error("resnet34", "C") == 24.19
    assert report.paper_error("plain34", "B") == 28.54  # a plain net has no shortcut to match
    assert report.paper_error("cifar_resnet8", "A") is None
    assert report.display_name("cifar_plain20") == "plain-20"
    assert report.display_name("resnet152") == "ResNet-152"


def test_curves_are_drawn(workdirs, tmp_path):
    out = tmp_path / "curves.png"
    result = _report("curves", *workdirs, "--out", str(out))
    assert result == 0
    _assert_png(out)


def _direct_responses(model, images):
    """Each 3x3 layer's BN output, computed from the modules by hand (basic blocks, post order)."""
    x = jnp.asarray(images)
    outputs = [model.bn1(model.conv1(x))]
    h = nnx.relu(outputs[-1])
    for stage in model.stages:
        for block in stage:
            first = block.bn1(block.conv1(h))
            second = block.bn2(block.conv2(nnx.relu(first)))
            outputs += [first, second]
            h = block(h)
    return [float(np.std(np.asarray(o), axis=(0, 1, 2)).mean()) for o in outputs]


def test_layer_responses_equal_a_direct_computation(workdirs, tmp_path):
    out, numbers = tmp_path / "responses.png", tmp_path / "responses.json"
    result = _report("responses", *workdirs, "--out", str(out), "--images", "40", "--json", str(numbers))
    assert result == 0
    _assert_png(out)
    reported = json.loads(numbers.read_text())
    assert list(reported) == ["plain-8", "ResNet-8"]
    for workdir, label in zip(workdirs, reported):
        config, model, _ = analysis.load_model(workdir)
        images, _ = analysis.eval_images(config, 40)
        direct = _direct_responses(model, images)
        assert len(direct) == 7  # the stem's 3x3 conv and two in each of three blocks
        np.testing.assert_allclose(reported[label], direct, rtol=1e-4)


def _zero_branch(block):
    """Post order: the branch ends in BN; with its scale and shift zero the branch adds 0."""
    block.bn2.scale[...] = jnp.zeros_like(block.bn2.scale[...])
    block.bn2.bias[...] = jnp.zeros_like(block.bn2.bias[...])


def test_lesion_equals_zeroed_branch_weights(workdirs):
    config, model, _ = analysis.load_model(workdirs[1])
    images, labels = analysis.eval_images(config, 64)
    study = analysis.lesion_study(model, images, labels, max_deleted=3, draws=2)
    assert study.downsamples == [False, True, True]
    assert study.baseline == analysis.error_rate(model, images, labels)
    for i, info in enumerate(models.blocks(model)):
        _, zeroed, _ = analysis.load_model(workdirs[1])
        _zero_branch(models.blocks(zeroed)[i].block)
        info.block.lesioned = True
        np.testing.assert_allclose(model(jnp.asarray(images)), zeroed(jnp.asarray(images)), atol=1e-5)
        info.block.lesioned = False
        assert study.single[i] == analysis.error_rate(zeroed, images, labels)
    assert sorted(study.random) == [1, 2, 3] and all(len(v) == 2 for v in study.random.values())
    # Deleting all three blocks is one draw: the zeroed network without any branch.
    _, zeroed, _ = analysis.load_model(workdirs[1])
    for info in models.blocks(zeroed):
        _zero_branch(info.block)
    assert study.random[3] == [analysis.error_rate(zeroed, images, labels)] * 2


def test_lesion_command_marks_what_a_plain_net_cannot_lose(workdirs, tmp_path):
    result = _report("lesion", "--checkpoint", workdirs[0], "--checkpoint", workdirs[1],
                     "--out-dir", str(tmp_path), "--images", "32", "--max-deleted", "1", "--draws", "1")
    assert result == 0
    studies = json.loads((tmp_path / "lesion.json").read_text())
    # plain-8: only the first block keeps its input's shape, so only it can be deleted.
    assert [e is None for e in studies["plain-8"]["single"]] == [False, True, True]
    assert all(e is not None for e in studies["ResNet-8"]["single"])
    assert "stage2.0 | yes" in (tmp_path / "lesion.md").read_text()
    _assert_png(tmp_path / "lesion_blocks.png")
    _assert_png(tmp_path / "lesion_count.png")


def test_not_a_workdir_is_one_line_and_exit_2(tmp_path, capsys):
    assert _report("curves", str(tmp_path), "--out", str(tmp_path / "x.png")) == 2
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and "not a run's workdir" in error
