"""The results table of runs, as the paper reports them: each run's final and best errors beside
the paper's for the same experiment, its size and speed (Markdown and CSV); and the names and data
the figures' titles and legends give the runs."""

import csv
import dataclasses
import io
import statistics
from typing import Any

from etils import epath
from flax import nnx

from resnet_jax import flops
from resnet_jax.analysis import layer_responses, paper_results
from resnet_jax.cli import config_files
from resnet_jax.training import loop


COLUMNS = ("run", "model", "shortcut", "data", "eval_split", "eval_protocol", "steps",
           "scheduled_steps", "final_error", "final_top5_error", "final_ema_error", "best_error",
           "best_chosen_on",
           "paper_error", "paper_top5_error", "paper_mean", "paper_std", "paper_runs",
           "paper_table", "note", "parameters", "multiply_adds", "images_per_second")


# Training examples of the splits the paper trained on, for runs whose length is given in epochs:
# the report may run where the data set is not.
TRAIN_EXAMPLES = {("imagenet2012", "train"): 1_281_167, ("cifar10", "train"): 50_000,
                  ("cifar10", "train[:45000]"): 45_000}


def display_name(model_name: str) -> str:
    """The paper's names: cifar_plain20 -> plain-20, resnet34 -> ResNet-34."""
    name = model_name.removeprefix("cifar_")
    for family, shown in (("resnet", "ResNet-"), ("plain", "plain-")):
        if name.startswith(family) and name[len(family):].isdigit():
            return shown + name[len(family):]
    return model_name


def error_percent(accuracy: float) -> float:
    return 100.0 * (1.0 - accuracy)


def scheduled_steps(config: Any) -> int | None:
    """The steps the run's schedule has, as the training loop counts them (`loop.total_steps`);
    None where it is set in epochs of a split whose size is not known here."""
    if config.train.num_steps > 0:
        return config.train.num_steps
    examples = TRAIN_EXAMPLES.get((config.data.name, config.data.train_split))
    if examples is None:
        return None
    return loop.total_steps(config, examples // config.train.batch_size)


def _model(workdir: str, config: Any) -> Any:
    """The run's network as shapes, all that counting needs; from the checkpoint where the
    config leaves the class count to the data."""
    num_classes = config.data.get("num_classes")
    if num_classes is None:
        return layer_responses.load_model(workdir)[1]
    return nnx.eval_shape(lambda: layer_responses.build_model(config, num_classes))


def table_row(workdir: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's results from its config.json and metrics.jsonl `rows`."""
    config = config_files.of_run(workdir)
    evals = [row for row in rows if "eval_accuracy" in row]
    top5 = [row for row in evals if "eval_top5_accuracy" in row]
    averaged = [row for row in evals if "ema_eval_accuracy" in row]  # train.ema_decay's
    speeds = [row["images_per_second"] for row in rows if "images_per_second" in row]
    steps, scheduled = max((row["step"] for row in rows), default=0), scheduled_steps(config)
    paper, note = paper_results.match(config)
    if paper is not None and steps != scheduled:
        # A few hundred iterations of a 64k schedule are not the paper's experiment.
        done = f"{steps:,} of {scheduled:,} steps" if scheduled else "its length is not known"
        paper, note = None, f"{paper.table}: shown once the schedule is finished ({done})"
    shown = dataclasses.asdict(paper) if paper else {}
    name, shortcut = config.model.name, config.model.get("shortcut")
    model = _model(workdir, config)
    return {
        "run": epath.Path(workdir).name, "model": display_name(name),
        "shortcut": "-" if "plain" in name or shortcut is None else shortcut,
        "data": config.data.name, "eval_split": config.data.eval_split,
        "eval_protocol": config.data.eval_preprocess,
        "steps": steps, "scheduled_steps": scheduled,
        "final_error": error_percent(evals[-1]["eval_accuracy"]) if evals else None,
        "final_top5_error": error_percent(top5[-1]["eval_top5_accuracy"]) if top5 else None,
        "final_ema_error": error_percent(averaged[-1]["ema_eval_accuracy"]) if averaged else None,
        "best_error": min(error_percent(row["eval_accuracy"]) for row in evals) if evals else None,
        # The best of many evals on the split it reports is biased low; on a split held out of
        # the training set (CIFAR val=True) it is model selection on a validation split.
        "best_chosen_on": "validation" if config.data.eval_split.startswith("train") else "eval",
        "paper_error": shown.get("top1"), "paper_top5_error": shown.get("top5"),
        "paper_mean": shown.get("mean"), "paper_std": shown.get("std"),
        "paper_runs": shown.get("runs"), "paper_table": shown.get("table"), "note": note,
        "parameters": flops.count_params(model),
        "multiply_adds": flops.count_macs(model, config.data.image_size),
        "images_per_second": statistics.median(speeds) if speeds else None,
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _paper_cell(row: dict[str, Any]) -> str:
    if row["paper_error"] is None:
        return ""
    text = f"{row['paper_error']:.2f}"
    if row["paper_runs"]:
        text += f" best of {row['paper_runs']}, mean {row['paper_mean']:.2f} ± {row['paper_std']:.2f}"
    if row["paper_top5_error"] is not None:
        text += f", top-5 {row['paper_top5_error']:.2f}"
    return f"{text} ({row['paper_table']})"


def _markdown_cells(row: dict[str, Any]) -> list[str]:
    scheduled = _cell(row["scheduled_steps"]) or "?"
    best = _cell(row["best_error"])
    return [row["run"], row["model"], row["shortcut"], row["data"], row["eval_split"],
            row["eval_protocol"], f"{row['steps']:,} of {scheduled}", _cell(row["final_error"]),
            _cell(row["final_top5_error"]), _cell(row["final_ema_error"]),
            f"{best} †" if best and row["best_chosen_on"] == "eval" else best,
            _paper_cell(row), row["note"], _cell(row["parameters"]), _cell(row["multiply_adds"]),
            _cell(row["images_per_second"])]


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ("run", "network", "shortcut", "data set", "eval split", "eval protocol", "steps",
              "final error (%)", "final top-5 error (%)", "final error, EMA weights (%)",
              "best error (%)", "paper error (%)",
              "note", "parameters", "multiply-adds", "train images/s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_markdown_cells(row)) + " |" for row in rows]
    lines += ["", "Final error: the last eval, the result to quote; of the weights, and of their "
              "moving average where the run kept one (train.ema_decay). † Best error: the lowest eval "
              "error of the run, chosen on the split it reports, so biased low (unmarked: chosen "
              "on a validation split held out of the training set). The paper's error is shown "
              "for the same network, data set, split and protocol, once the schedule is finished."]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def labels(workdirs: list[str]) -> list[str]:
    """The paper's name of each run's network; with the workdir's name where two runs share one."""
    names = [display_name(config_files.of_run(w).model.name) for w in workdirs]
    return [name if names.count(name) == 1 else f"{name} ({epath.Path(w).name})"
            for w, name in zip(workdirs, names)]


def data_values(workdirs: list[str], field: str, split: str | None = None) -> str:
    """A data field of the runs ("cifar10"; "cifar10, digits" where they differ); `split`
    replaces each run's eval split where given."""
    configs = [config_files.of_run(w).data for w in workdirs]
    values = [split if split and field == "eval_split" else c[field] for c in configs]
    if field == "name":  # an image folder by its own name, not its whole path
        values = [f"image folder {epath.Path(v.split(':', 1)[1]).name!r}"
                  if v.startswith("imagefolder:") else v for v in values]
    return ", ".join(dict.fromkeys(values))


def measured_on(workdirs: list[str], split: str | None = None) -> str:
    """What a figure is measured on, for its title."""
    return f"{data_values(workdirs, 'name')}, {data_values(workdirs, 'eval_split', split)} split"


def lesion_markdown(studies: dict[str, layer_responses.LesionStudy]) -> str:
    lines = []
    for label, study in studies.items():
        lines += [f"### {label}: error {study.baseline:.2f}% with every block", "",
                  "| block deleted | down-samples | error (%) |", "|---|---|---|"]
        lines += [f"| {name} | {'yes' if down else ''} | {_cell(error) or 'n/a (plain, reshapes)'} |"
                  for name, down, error in zip(study.names, study.downsamples, study.single)]
        lines += ["", "| blocks deleted at random | draws | mean error (%) | min | max |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {len(errors)} | {statistics.mean(errors):.2f} | {min(errors):.2f} | "
                  f"{max(errors):.2f} |" for k, errors in study.random.items()]
        lines.append("")
    return "\n".join(lines)
