"""What the terminal says of a run's progress: one line per log window, in the project's words,
with the training time left at this run's own speed; an evaluation that takes a while says how
far it got."""

import logging

import pytest

from resnet_jax.data import sources
from resnet_jax.training import evaluation, metrics


@pytest.mark.parametrize("seconds, shown", [(0.4, "0 s"), (45, "45 s"), (59.6, "1 min 00 s"),
                                            (185, "3 min 05 s"), (7500, "2 h 05 min")])
def test_a_duration_reads_in_minutes_and_seconds(seconds, shown):
    assert metrics.duration(seconds) == shown


def test_the_progress_line_says_where_the_run_is_and_the_time_left():
    window = {"images_per_second": 512.0, "step_seconds": 0.5}
    assert metrics.progress(50, 300, window) == (
        "step 50/300 (16.7%), 512 images/s, 0.5 s a step; 2 min 05 s of training left")
    # A window that holds the compile says nothing of the time left.
    assert "follows the next window" in metrics.progress(50, 300, window, compiled=True)


def test_an_eval_that_takes_a_while_says_how_far_it_got(monkeypatch, caplog):
    monkeypatch.setattr(evaluation._EvalPass, "FIRST", 0.0)
    monkeypatch.setattr(evaluation._EvalPass, "EVERY", 0.0)
    caplog.set_level(logging.INFO)
    passed = evaluation._EvalPass(iter(range(3)))
    assert list(passed) == [0, 1, 2]
    passed.agree()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Evaluating: ")]
    assert [line.split(" in ")[0] for line in said] == [
        "Evaluating: 1 batches", "Evaluating: 2 batches", "Evaluating: 3 batches"]


def test_an_eval_pass_raises_its_bad_images_after_its_last_batch():
    def batches():
        yield "batch"
        raise sources.BadImageError("eval data x: 1 image that does not decode: a.jpg")

    passed = evaluation._EvalPass(batches())
    assert list(passed) == ["batch"]
    with pytest.raises(sources.BadImageError, match="a.jpg"):
        passed.agree()


@pytest.mark.slow
def test_the_readmes_quoted_lines_are_what_the_command_prints(tmp_path):
    # The README quoted fields and a progress line that the command no longer printed.
    import re  # pylint: disable=import-outside-toplevel

    from runs import REPO, run_main  # pylint: disable=import-outside-toplevel

    readme = (REPO / "README.md").read_text()
    quoted = re.search(r"^    \[(\d+)\] (.*)\n    (step .*)$", readme, re.MULTILINE)
    step, fields, progress = int(quoted.group(1)), quoted.group(2), quoted.group(3)
    lines = run_main(tmp_path, **{"train.num_steps": 4, "eval.every_steps": 4,
                                  "log_every_steps": 2}).stderr.splitlines()
    last = next(line for line in reversed(lines) if " [4] " in line)
    assert [f.split("=")[0] for f in last.split(" [4] ")[1].split(", ")] == \
        [f.split("=")[0] for f in fields.split(", ")], (last, fields)
    shape = re.compile(r"step \d+/\d+ \(\d+\.\d%\), [\d.]+ images/s, [\d.]+ s a step; (.*) of "
                       r"training left")
    assert shape.fullmatch(progress) and step == 300, progress
    assert any(shape.fullmatch(line.split(" ", 1)[1]) for line in lines), lines[-6:]
