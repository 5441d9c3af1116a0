"""The report: the table against the paper's figures, the figures' axes, on runs made here
(small trainings for what needs a checkpoint; config.json and metrics.jsonl written by hand for
the table and the curves)."""

import csv
import dataclasses
import io
import json
import subprocess
import sys

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from configs import cifar, plain34, resnet34
from resnet_jax import flops, models, report
from resnet_jax.analysis import figures, layer_responses, paper_results, tables
from resnet_jax.data import preprocess
from resnet_jax.run import jsonl
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


# Eval accuracies of a written run: the best (0.93) is not the last (0.925).
EVAL_ACCURACIES = (0.80, 0.92, 0.93, 0.925)


def _written_run(workdir, config, last_step, rows=True):
    """A workdir as a run leaves it, without training: config.json, and metrics.jsonl with a log
    line and an eval at 4 steps up to `last_step` (rows=False: no metrics.jsonl; []: empty)."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    if rows is True:
        rows = [{"step": last_step * (i + 1) // 4, "train_accuracy": 0.5 + 0.1 * i,
                 "images_per_second": 100.0 + i, "eval_accuracy": accuracy,
                 "eval_top5_accuracy": min(1.0, accuracy + 0.05)}
                for i, accuracy in enumerate(EVAL_ACCURACIES)]
    if rows is not False:
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(workdir)


def _digits(**changes):
    """The quickstart's network and data (digits, not CIFAR-10), as small as the runs here."""
    return runs.small_config(**changes)


def _imagenet(get_config, shortcut, protocol):
    config = get_config()
    config.model.shortcut, config.data.eval_preprocess = shortcut, protocol
    return config


def _table(tmp_path, *workdirs):
    assert _report("table", *workdirs, "--csv", str(tmp_path / "t.csv"),
                   "--markdown", str(tmp_path / "t.md")) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    return {row["run"]: row for row in rows}, (tmp_path / "t.md").read_text()


@pytest.mark.slow
def test_table_has_a_row_per_run_with_its_numbers(workdirs, tmp_path):
    table, md = tmp_path / "t.csv", tmp_path / "t.md"
    result = subprocess.run(
        [sys.executable, "-m", "resnet_jax.report", "table", *workdirs, "--csv", str(table),
         "--markdown", str(md)], cwd=runs.REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"wrote {table}", f"wrote {md}"]
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert [r["model"] for r in rows] == ["plain-8", "ResNet-8"]
    for row, workdir, name in zip(rows, workdirs, ("cifar_plain8", "cifar_resnet8")):
        evals = [r for r in jsonl.read_rows(workdir) if "eval_accuracy" in r]
        assert float(row["final_error"]) == pytest.approx(100 * (1 - evals[-1]["eval_accuracy"]))
        assert float(row["final_top5_error"]) == pytest.approx(100 * (1 - evals[-1]["eval_top5_accuracy"]))
        assert float(row["best_error"]) == pytest.approx(min(100 * (1 - r["eval_accuracy"]) for r in evals))
        model = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
        assert int(row["parameters"]) == flops.count_params(model)
        assert int(row["multiply_adds"]) == flops.count_macs(model, 8)
        assert int(row["steps"]) == int(row["scheduled_steps"]) == runs.SMALL["train.num_steps"]
        assert (row["data"], row["eval_split"], row["eval_protocol"]) == ("digits", "test", "none")
        assert row["paper_error"] == "" and float(row["images_per_second"]) > 0
    lines = md.read_text().splitlines()
    assert "plain-8" in lines[2] and "ResNet-8" in lines[3] and lines[4] == ""
    assert "| 6 of 6 |" in lines[3]
    assert tables.display_name("cifar_plain20") == "plain-20"
    assert tables.display_name("resnet152") == "ResNet-152"


@pytest.mark.slow
def test_table_shows_the_paper_only_for_the_same_network_data_split_and_protocol(tmp_path):
    made = tmp_path / "runs"
    workdirs = [
        _written_run(made / "resnet110", cifar.get_config("depth=110"), 64_000),
        _written_run(made / "resnet110_half", cifar.get_config("depth=110"), 32_000),
        _written_run(made / "resnet110_val", cifar.get_config("depth=110,val=True"), 64_000),
        _written_run(made / "digits", _digits(**{"model.name": "cifar_resnet20"}), 6),
        # 120 epochs of ImageNet at batch 256: 600,480 steps (train.total_steps).
        _written_run(made / "resnet34_10crop", _imagenet(resnet34.get_config, "A", "ten_crop"), 600_480),
        _written_run(made / "resnet34_center", _imagenet(resnet34.get_config, "A", "center"), 600_480),
        _written_run(made / "plain34", _imagenet(plain34.get_config, "B", "ten_crop"), 600_480),
    ]
    rows, md = _table(tmp_path, *workdirs)
    protocols = {run: (r["data"], r["eval_split"], r["eval_protocol"]) for run, r in rows.items()}
    assert protocols == {
        "resnet110": ("cifar10", "test", "none"), "resnet110_half": ("cifar10", "test", "none"),
        "resnet110_val": ("cifar10", "train[45000:]", "none"), "digits": ("digits", "test", "none"),
        "resnet34_10crop": ("imagenet2012", "validation", "ten_crop"),
        "resnet34_center": ("imagenet2012", "validation", "center"),
        "plain34": ("imagenet2012", "validation", "ten_crop")}
    best = rows["resnet110"]
    # Table 6's "best (mean +- std)" of 5 runs.
    assert (best["paper_error"], best["paper_mean"], best["paper_std"], best["paper_runs"],
            best["paper_table"]) == ("6.43", "6.61", "0.16", "5", "Table 6")
    assert "6.43 best of 5, mean 6.61 ± 0.16 (Table 6)" in md
    assert (rows["resnet34_10crop"]["paper_error"], rows["plain34"]["paper_error"]) == ("25.03", "28.54")
    for run in ("resnet110_half", "resnet110_val", "digits", "resnet34_center"):
        assert rows[run]["paper_error"] == rows[run]["paper_mean"] == "", run
    assert rows["resnet110_half"]["note"] == ("Table 6: shown once the schedule is finished "
                                              "(32,000 of 64,000 steps)")
    assert "train[45000:]" in rows["resnet110_val"]["note"]
    assert "ten_crop" in rows["resnet34_center"]["note"] and "center" in rows["resnet34_center"]["note"]
    assert rows["digits"]["note"] == ""  # the paper has nothing on digits to point to
    # The last eval is the headline; the best is marked where it was chosen on the split it reports.
    assert float(best["final_error"]) == pytest.approx(7.5)
    assert float(best["best_error"]) == pytest.approx(7.0)
    assert (best["best_chosen_on"], rows["resnet110_val"]["best_chosen_on"]) == ("eval", "validation")
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()}
    assert "| 7.00 † |" in lines["resnet110"] and "| 7.00 |" in lines["resnet110_val"]
    assert "| 32,000 of 64,000 |" in lines["resnet110_half"]
    assert int(best["parameters"]) == 1_727_962  # DESIGN.md's ResNet-110, option A
    assert all(row["final_ema_error"] == "" for row in rows.values())  # none kept an average


def test_a_run_with_a_moving_average_shows_its_error_beside_the_weights(tmp_path):
    config = _digits(**{"train.ema_decay": 0.999})
    evals = [{"step": 3, "eval_accuracy": 0.8, "ema_eval_accuracy": 0.85},
             {"step": 6, "eval_accuracy": 0.9, "ema_eval_accuracy": 0.925}]
    workdir = _written_run(tmp_path / "averaged", config, 6, rows=evals)
    row = tables.table_row(workdir, evals)
    assert row["final_error"] == pytest.approx(10.0) and row["final_ema_error"] == pytest.approx(7.5)
    line = tables.markdown([row]).splitlines()[2]
    assert "| 10.00 | | 7.50 |" in line.replace("|  |", "| |")


def test_paper_match_needs_the_paper_network_and_input():
    assert paper_results.match(cifar.get_config("depth=56"))[0].top1 == 6.97
    assert paper_results.match(cifar.get_config("depth=8")) == (None, "")
    config = _imagenet(resnet34.get_config, "C", "ten_crop")
    assert paper_results.match(config)[0].top1 == 24.19
    config.model.stride_on = "3x3"  # torchvision's v1.5 is another network
    result, why = paper_results.match(config)
    assert result is None and "stride_on=3x3" in why
    fifty = _imagenet(resnet34.get_config, "B", "ten_crop")
    fifty.model.name = "resnet50"
    assert (paper_results.match(fifty)[0].top1, paper_results.match(fifty)[0].top5) == (22.85, 6.71)
    fifty.data.image_size = 160
    assert paper_results.match(fifty)[0] is None
    pre = cifar.get_config("depth=110")
    pre.model.block_order = "pre"  # He et al. 2016's blocks, not this paper's
    assert paper_results.match(pre)[0] is None
    # One figure per condition in the table.
    keys = [(r.data, r.protocol, r.model, r.shortcut) for r in paper_results.PAPER]
    assert len(keys) == len(set(keys))


def test_runs_without_metrics_are_skipped_with_a_warning(tmp_path, capsys):
    good = _written_run(tmp_path / "good", _digits(), 6)
    missing = _written_run(tmp_path / "missing", _digits(), 6, rows=False)
    empty = _written_run(tmp_path / "empty", _digits(), 6, rows=[])
    rows, _ = _table(tmp_path, good, missing, empty)
    assert list(rows) == ["good"]
    out, err = capsys.readouterr()
    assert err == (f"resnet_jax.report: warning: skipping {missing}: no metrics.jsonl\n"
                   f"resnet_jax.report: warning: skipping {empty}: metrics.jsonl is empty\n")
    assert out == f"wrote {tmp_path / 't.csv'}\nwrote {tmp_path / 't.md'}\n"
    assert _report("curves", good, missing, "--out", str(tmp_path / "c.png")) == 0
    assert f"skipping {missing}" in capsys.readouterr().err
    _assert_png(tmp_path / "c.png")
    assert _report("table", missing, empty) == 2
    assert capsys.readouterr().err.endswith("error: none of the runs has metrics to report\n")


def _integers(ticks):
    return all(float(t).is_integer() for t in ticks)


def test_curves_ticks_labels_and_files(tmp_path, capsys):
    runs_here = {w: jsonl.read_rows(w) for w in (
        _written_run(tmp_path / "plain", _digits(**{"model.name": "cifar_plain8"}), 6),
        _written_run(tmp_path / "resnet", _digits(), 6))}
    fig = figures.plot_curves(runs_here)
    plain, resnet = fig.axes
    assert (plain.get_title(), resnet.get_title()) == ("plain networks", "ResNets")
    assert "digits" in fig.get_suptitle() and "test split" in fig.get_suptitle()
    for ax in (plain, resnet):
        assert _integers(ax.get_xticks()) and ax.get_xlabel() == "iterations"
        keys = [text.get_text() for text in ax.get_legend().get_texts()]
        assert keys[-2:] == ["training error (train)", "eval error (test)"]
    assert plain.get_ylabel() == "top-1 error (%)"
    out = tmp_path / "curves.png"
    written = figures.save(fig, out, pdf=True)
    assert written == [str(out), str(tmp_path / "curves.pdf")]
    height, width = matplotlib.image.imread(str(out)).shape[:2]
    assert (width, height) == tuple(round(s * figures.DPI) for s in fig.get_size_inches())
    assert figures.DPI >= 150 and (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")
    assert _report("curves", *runs_here, "--out", str(out), "--pdf") == 0
    assert capsys.readouterr().out == f"wrote {out}\nwrote {tmp_path / 'curves.pdf'}\n"


def test_response_and_lesion_figures_count_in_integers_and_name_blocks():
    fig = figures.plot_responses({"plain-8": [1.0, 0.8, 0.9, 0.7, 0.75, 0.6, 0.5],
                                 "ResNet-8": [1.0, 0.5, 0.4, 0.3, 0.35, 0.2, 0.25]},
                                 "digits, test split, first 40 images")
    for ax in fig.axes:
        assert _integers(ax.get_xticks()) and ax.get_xlabel().startswith("3x3 layer")
        assert "std" in ax.get_ylabel() and ax.get_legend() is not None
    assert fig.axes[0].get_title() == "Layer responses: digits, test split, first 40 images"
    study = layer_responses.LesionStudy(
        baseline=10.0, names=["stage1.0", "stage2.0", "stage3.0"], downsamples=[False, True, True],
        single=[12.0, 30.0, 25.0], random={1: [12.0, 30.0], 2: [40.0, 35.0], 3: [60.0, 60.0]})
    plain = dataclasses.replace(study, single=[15.0, None, None])
    blocks, count = figures.plot_lesion({"ResNet-8": study, "plain-8": plain}, "digits, test split")
    (ax,) = blocks.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["stage1.0", "stage2.0", "stage3.0"]
    assert ax.get_ylabel() == "top-1 eval error (%)" and "digits, test split" in ax.get_title()
    keys = [t.get_text() for t in ax.get_legend().get_texts()]
    assert keys == ["ResNet-8", "plain-8", "down-sampling block", "no block deleted"]
    (ax,) = count.axes
    assert _integers(ax.get_xticks()) and ax.get_xlabel() == "blocks deleted at random"
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "mean ± std over 2 random draws"


@pytest.mark.slow
def test_curves_are_drawn(workdirs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert _report("curves", *workdirs, "--out", str(out)) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
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


@pytest.mark.slow
def test_layer_responses_equal_a_direct_computation(workdirs, tmp_path, capsys):
    out, numbers = tmp_path / "responses.png", tmp_path / "responses.json"
    result = _report("responses", *workdirs, "--out", str(out), "--images", "40", "--json", str(numbers))
    assert result == 0
    assert capsys.readouterr().out == f"wrote {out}\nwrote {numbers}\n"
    _assert_png(out)
    reported = json.loads(numbers.read_text())
    assert list(reported) == ["plain-8", "ResNet-8"]
    for workdir, label in zip(workdirs, reported):
        config, model, _ = layer_responses.load_model(workdir)
        images, _ = layer_responses.eval_images(config, 40)
        direct = _direct_responses(model, images)
        assert len(direct) == 7  # the stem's 3x3 conv and two in each of three blocks
        np.testing.assert_allclose(reported[label], direct, rtol=1e-4)


def _zero_branch(block):
    """Post order: the branch ends in BN; with its scale and shift zero the branch adds 0."""
    block.bn2.scale[...] = jnp.zeros_like(block.bn2.scale[...])
    block.bn2.bias[...] = jnp.zeros_like(block.bn2.bias[...])


@pytest.mark.slow
def test_lesion_equals_zeroed_branch_weights(workdirs):
    config, model, _ = layer_responses.load_model(workdirs[1])
    images, labels = layer_responses.eval_images(config, 64)
    study = layer_responses.lesion_study(model, images, labels, max_deleted=3, draws=2)
    assert study.downsamples == [False, True, True]
    assert study.baseline == layer_responses.error_rate(model, images, labels)
    for i, info in enumerate(models.blocks(model)):
        _, zeroed, _ = layer_responses.load_model(workdirs[1])
        _zero_branch(models.blocks(zeroed)[i].block)
        info.block.lesioned = True
        np.testing.assert_allclose(model(jnp.asarray(images)), zeroed(jnp.asarray(images)), atol=1e-5)
        info.block.lesioned = False
        assert study.single[i] == layer_responses.error_rate(zeroed, images, labels)
    assert sorted(study.random) == [1, 2, 3] and all(len(v) == 2 for v in study.random.values())
    # Deleting all three blocks is one draw: the zeroed network without any branch.
    _, zeroed, _ = layer_responses.load_model(workdirs[1])
    for info in models.blocks(zeroed):
        _zero_branch(info.block)
    assert study.random[3] == [layer_responses.error_rate(zeroed, images, labels)] * 2


@pytest.mark.slow
def test_lesion_command_marks_what_a_plain_net_cannot_lose(workdirs, tmp_path, capsys):
    result = _report("lesion", "--checkpoint", workdirs[0], "--checkpoint", workdirs[1],
                     "--out-dir", str(tmp_path), "--images", "32", "--max-deleted", "1", "--draws", "1",
                     "--pdf")
    assert result == 0
    files = ("lesion.json", "lesion.md", "lesion_blocks.png", "lesion_blocks.pdf",
             "lesion_count.png", "lesion_count.pdf")
    assert capsys.readouterr().out == "".join(f"wrote {tmp_path / f}\n" for f in files)
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


@pytest.mark.parametrize("args, says", [
    (("curves", "W"), "curves: the following arguments are required: --out"),
    (("tables", "W"), "invalid choice: 'tables'"),
    (("responses", "W", "--out", "x.png", "--images", "many"), "invalid int value: 'many'")])
def test_bad_arguments_are_one_line_and_exit_2(args, says, capsys):
    with pytest.raises(SystemExit) as raised:
        _report(*args)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("resnet_jax: error: python -m resnet_jax.report")
    assert says in error


@pytest.mark.parametrize("protocol", preprocess.MANY_VIEWS)
def test_runs_tested_on_many_views_are_analysed_on_their_centre_crops(protocol):
    config = runs.small_config(**{"data.image_size": 12, "data.resize_size": 16,
                                  "data.eval_scales": (12, 16), "data.eval_preprocess": "center"})
    centre, centre_labels = layer_responses.eval_images(config, 20)
    config.data.eval_preprocess = protocol
    images, labels = layer_responses.eval_images(config, 20)
    assert images.shape == (20, 12, 12, 3)
    np.testing.assert_array_equal(images, centre)
    np.testing.assert_array_equal(labels, centre_labels)


def _inside(fig) -> list[str]:
    """The texts of `fig` (its title; each axes' title, axis labels and legend) that reach past
    its edges, as saved."""
    fig.tight_layout()
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    texts = [fig._suptitle] if fig._suptitle else []  # pylint: disable=protected-access
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
    outside = []
    for text in texts:
        if not text.get_visible() or not text.get_text():
            continue
        extent = text.get_window_extent(renderer)
        if extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1 or extent.y0 < box.y0 - 1 or \
                extent.y1 > box.y1 + 1:
            outside.append(text.get_text())
    return outside


def test_every_figure_fits_its_texts_and_draws_every_series(tmp_path):
    # The curves' title was cut at both edges (the data path in it), the responses' on the
    # right, and a run with one eval point had no eval curve although the legend named it.
    folder = f"imagefolder:{tmp_path / 'a' / 'rather' / 'long' / 'path' / 'to' / 'my images'}"
    one_eval = [{"step": 2, "train_accuracy": 0.5}, {"step": 4, "train_accuracy": 0.6,
                                                     "eval_accuracy": 0.55}]
    plain = _written_run(tmp_path / "plain", _digits(**{"model.name": "cifar_plain8",
                                                        "data.name": folder}), 4, rows=one_eval)
    resnet = _written_run(tmp_path / "resnet", _digits(**{"data.name": folder}), 8)
    fig = figures.plot_curves({w: jsonl.read_rows(w) for w in (plain, resnet)})
    assert "image folder 'my images'" in fig.get_suptitle() and str(tmp_path) not in fig.get_suptitle()
    assert _inside(fig) == []
    lone = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) == 1]
    assert lone and all(line.get_marker() == "o" for line in lone)  # the eval point, drawn
    where = f"{folder}, test split, first 40 images"
    fig = figures.plot_responses({"plain-8": [1.0, 0.8, 0.9], "ResNet-8": [1.0, 0.5, 0.4]}, where)
    assert _inside(fig) == []
    study = layer_responses.LesionStudy(baseline=10.0, names=["stage1.0", "stage2.0"],
                                        downsamples=[False, True], single=[12.0, 30.0],
                                        random={1: [12.0, 30.0], 2: [40.0, 35.0]})
    for fig in figures.plot_lesion({"ResNet-8": study}, where):
        assert _inside(fig) == []


@pytest.mark.slow
def test_the_report_command_shows_no_library_warnings(workdirs, tmp_path):
    # orbax's three warnings about its read-only manager came before "wrote ...".
    done = subprocess.run([sys.executable, "-m", "resnet_jax.report", "responses", *workdirs,
                           "--out", str(tmp_path / "r.png"), "--images", "8"], cwd=runs.REPO,
                          env=runs.environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNING:absl" not in done.stderr and "read only" not in done.stderr, done.stderr
