"""A workdir whose layout is broken is refused in one line naming the path, before anything is
written; a resume that loses rows says so; a learning rate float32 cannot hold is refused."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from etils import epath

from resnet_jax.run import jsonl, validate
from runs import REPO, environment, main_command, small_config


@pytest.fixture
def finished(finished_run):
    return finished_run


def _killed_copy(finished, destination):
    """`finished` as if killed after writing row 6 but before saving its checkpoint: it resumes
    from step 3 (a finished run would not start at all)."""
    shutil.copytree(finished, destination)
    shutil.rmtree(destination / "checkpoints" / "6")
    (destination / "log.txt").unlink()
    return destination


def _files(workdir):
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file()}


def _replace_line(path, index, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[index] = text
    path.write_text("".join(lines))


def _checkpoints_a_file(workdir):
    shutil.rmtree(workdir / "checkpoints")
    (workdir / "checkpoints").write_text("not a directory")
    return workdir / "checkpoints", None


def _middle_line(workdir):
    _replace_line(workdir / jsonl.JSONL, 1, '{"step": 2, "train_lo\n')
    return workdir / jsonl.JSONL, 2


def _last_line(workdir):
    # Cut short: what an append that did not finish would leave (no writer appends any more).
    text = (workdir / jsonl.JSONL).read_text()
    (workdir / jsonl.JSONL).write_text(text[:-40])
    return workdir / jsonl.JSONL, 6


def _config_not_json(workdir):
    (workdir / "config.json").write_text("seed: 0\n")
    return workdir / "config.json", None


def _config_truncated(workdir):
    text = (workdir / "config.json").read_text()
    (workdir / "config.json").write_text(text[:len(text) // 2])
    return workdir / "config.json", None


@pytest.mark.slow
@pytest.mark.parametrize("breakage", [_checkpoints_a_file, _middle_line, _last_line, _config_not_json,
                                      _config_truncated], ids=lambda f: f.__name__.strip("_"))
def test_a_broken_workdir_is_refused_in_one_line_touching_nothing(finished, tmp_path, breakage):
    workdir = _killed_copy(finished, tmp_path / "run")
    path, line = breakage(workdir)
    before = _files(workdir)
    result = subprocess.run(main_command(workdir), cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=600)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-3000:]
    assert last.startswith("resnet_jax: error:") and str(path) in last, last
    assert line is None or f"line {line}" in last, last
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert _files(workdir) == before  # no lock.json, no log.txt, nothing rewritten


@pytest.mark.slow
def test_a_finished_run_with_a_bad_metrics_line_is_refused_in_one_line(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    _middle_line(workdir)
    before = _files(workdir)
    result = subprocess.run(main_command(workdir), cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=600)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("resnet_jax: error:") and f"{workdir / jsonl.JSONL}: line 2" in last, last
    assert _files(workdir) == before


@pytest.mark.slow
def test_a_finished_run_without_metrics_still_says_it_has_finished(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    (workdir / jsonl.JSONL).unlink()
    result = subprocess.run(main_command(workdir), cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "This run has finished" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_a_resume_without_metrics_says_the_earlier_rows_are_gone(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    (workdir / jsonl.JSONL).unlink()
    result = subprocess.run(main_command(workdir, "--allow_config_change", **{"train.num_steps": 8}),
                            cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in (workdir / "log.txt").read_text().splitlines()
               if "no metrics.jsonl" in line]
    assert len(warning) == 1 and "up to step 6" in warning[0], warning
    assert [row["step"] for row in jsonl.read_rows(workdir)] == [7, 8]


def test_rows_without_a_checkpoint_are_said_to_be_replaced(tmp_path, caplog):
    config = small_config()
    (tmp_path / jsonl.JSONL).write_text('{"step": 1, "train_loss": 2.5}\n')
    validate.check_workdir(epath.Path(tmp_path), config.to_json_best_effort(), False)
    assert "starts from step 0" in caplog.text and "1 row" in caplog.text, caplog.text


@pytest.mark.slow
def test_a_learning_rate_float32_turns_to_zero_is_refused(tmp_path):
    result = subprocess.run(main_command(tmp_path / "run", **{"schedule.base_lr": 1e-300}), cwd=REPO,
                            env=environment(), capture_output=True, text=True, timeout=600)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-3000:]
    assert last.startswith("resnet_jax: error: schedule.base_lr") and "1e-300" in last, last
    assert f"{np.finfo(np.float32).tiny:.4g}" in last, last
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value", [("base_lr", 1e-40), ("base_lr", 1e39), ("warmup_lr", 1e-45)])
def test_learning_rates_outside_float32s_normal_range_are_refused(field, value):
    config = small_config(**{"schedule.warmup_steps": 2, f"schedule.{field}": value})
    with pytest.raises(validate.SetupError, match=rf"^schedule\.{field} must be .*; got {re.escape(repr(value))}$"):
        validate.check_numbers(config)


@pytest.mark.slow
def test_the_config_json_of_another_run_still_compares(finished, tmp_path):
    """A readable config.json keeps its meaning: another config is refused, naming the field."""
    config = small_config(**{"train.num_steps": 7})
    with pytest.raises(validate.SetupError, match="train.num_steps: 6 -> 7"):
        validate.check_workdir(epath.Path(_killed_copy(finished, tmp_path / "run")),
                               config.to_json_best_effort(), False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["num_steps"] == 6
