"""Reports runs as the paper does: a results table, training curves, layer responses.

    python -m resnet_jax.report table WORKDIR... [--markdown FILE] [--csv FILE]
    python -m resnet_jax.report curves WORKDIR... --out FILE.png [--pdf]
    python -m resnet_jax.report responses WORKDIR... --out FILE.png [--images N] [--json FILE] [--pdf]
    python -m resnet_jax.report lesion --checkpoint WORKDIR [--checkpoint ...] --out-dir DIR [--pdf]

`table`: one row per run: its data set, eval split and test protocol, steps done of its
schedule, final eval error (the headline) and best, parameters, multiply-adds, training
images/s; the paper's error beside it only where the paper measured the same network on the
same data, split and protocol and the run has finished its schedule (`paper_results.py`).
`curves`: Fig. 4 and 6, training error thin and dashed, eval error bold, one colour per
network, plain nets and ResNets in two panels. `responses`: Fig. 7, the standard deviation of
each 3x3 layer's response, in depth order and sorted by magnitude. `lesion`: Veit, Wilber and
Belongie 2016, the eval error with each single block deleted and with k random blocks deleted
(lesion.md, lesion.json, lesion_blocks.png, lesion_count.png).

Figures are PNGs at 200 dpi, with a PDF beside each with --pdf. Every command prints one line
per file it writes, each written whole or not at all. A run without metrics is skipped by `table`
and `curves`, with a warning.

Exit statuses: 0 done; 2 bad input, in one line; 130 stopped by Ctrl-C, in one line.
"""

import sys

from resnet_jax.run import console
from resnet_jax.training import interrupt

# First: the imports below take seconds (TensorFlow's among them: its notices to no terminal).
if __name__ == "__main__":
    interrupt.install("resnet_jax.report")
    console.import_tensorflow()

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import textwrap  # noqa: E402
from typing import Any  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only: no display on a pod or in CI
import matplotlib.font_manager  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from etils import epath  # noqa: E402
from flax import nnx  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from resnet_jax import flops
from resnet_jax.analysis import layer_responses, paper_results
from resnet_jax.cli import config_files
from resnet_jax.training import loop, metrics  # noqa: E402
from resnet_jax.run.paths import write_bytes, write_text  # noqa: E402

COLUMNS = ("run", "model", "shortcut", "data", "eval_split", "eval_protocol", "steps",
           "scheduled_steps", "final_error", "final_top5_error", "best_error", "best_chosen_on",
           "paper_error", "paper_top5_error", "paper_mean", "paper_std", "paper_runs",
           "paper_table", "note", "parameters", "multiply_adds", "images_per_second")

# Training examples of the splits the paper trained on, for runs whose length is given in epochs:
# the report may run where the data set is not.
TRAIN_EXAMPLES = {("imagenet2012", "train"): 1_281_167, ("cifar10", "train"): 50_000,
                  ("cifar10", "train[:45000]"): 45_000}

DPI = 200


def display_name(model_name: str) -> str:
    """The paper's names: cifar_plain20 -> plain-20, resnet34 -> ResNet-34."""
    name = model_name.removeprefix("cifar_")
    for family, shown in (("resnet", "ResNet-"), ("plain", "plain-")):
        if name.startswith(family) and name[len(family):].isdigit():
            return shown + name[len(family):]
    return model_name


def _error(accuracy: float) -> float:
    return 100.0 * (1.0 - accuracy)


def scheduled_steps(config: Any) -> int | None:
    """The steps the run's schedule has, as train.py counts them; None where it is set in epochs
    of a split whose size is not known here."""
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
        "final_error": _error(evals[-1]["eval_accuracy"]) if evals else None,
        "final_top5_error": _error(top5[-1]["eval_top5_accuracy"]) if top5 else None,
        "best_error": min(_error(row["eval_accuracy"]) for row in evals) if evals else None,
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
            _cell(row["final_top5_error"]),
            f"{best} †" if best and row["best_chosen_on"] == "eval" else best,
            _paper_cell(row), row["note"], _cell(row["parameters"]), _cell(row["multiply_adds"]),
            _cell(row["images_per_second"])]


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ("run", "network", "shortcut", "data set", "eval split", "eval protocol", "steps",
              "final error (%)", "final top-5 error (%)", "best error (%)", "paper error (%)",
              "note", "parameters", "multiply-adds", "train images/s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_markdown_cells(row)) + " |" for row in rows]
    lines += ["", "Final error: the last eval, the result to quote. † Best error: the lowest eval "
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


def _warn(message: str) -> None:
    print(f"resnet_jax.report: warning: {message}", file=sys.stderr)


def _say(message: str) -> None:
    """What a command that reads checkpoints and computes is doing, on stderr (stdout lists the
    files written)."""
    print(f"resnet_jax.report: {message}", file=sys.stderr, flush=True)


def runs_with_metrics(workdirs: list[str]) -> dict[str, list[dict[str, Any]]]:
    """{workdir: its metrics rows}, without the runs that have none: each is named in a warning,
    so that one unstarted or broken run does not stop a report of many."""
    found = {}
    for workdir in workdirs:
        path = epath.Path(workdir) / metrics.JSONL
        try:
            rows = metrics.read_rows(workdir) if path.exists() else None
        except ValueError as error:
            _warn(f"skipping {workdir}: {error}")
            continue
        if rows:
            found[workdir] = rows
        else:
            _warn(f"skipping {workdir}: {'metrics.jsonl is empty' if rows == [] else 'no metrics.jsonl'}")
    return found


def _labels(workdirs: list[str]) -> list[str]:
    """The paper's name of each run's network; with the workdir's name where two runs share one."""
    names = [display_name(config_files.of_run(w).model.name) for w in workdirs]
    return [name if names.count(name) == 1 else f"{name} ({epath.Path(w).name})"
            for w, name in zip(workdirs, names)]


def _values(workdirs: list[str], field: str, split: str | None = None) -> str:
    """A data field of the runs ("cifar10"; "cifar10, digits" where they differ); `split`
    replaces each run's eval split where given."""
    configs = [config_files.of_run(w).data for w in workdirs]
    values = [split if split and field == "eval_split" else c[field] for c in configs]
    if field == "name":  # an image folder by its own name, not its whole path
        values = [f"image folder {epath.Path(v.split(':', 1)[1]).name!r}"
                  if v.startswith("imagefolder:") else v for v in values]
    return ", ".join(dict.fromkeys(values))


def _where(workdirs: list[str], split: str | None = None) -> str:
    """What a figure is measured on, for its title."""
    return f"{_values(workdirs, 'name')}, {_values(workdirs, 'eval_split', split)} split"


def save(fig: Any, path: epath.PathLike, pdf: bool = False) -> list[str]:
    """`fig` to `path` as a PNG, and beside it as a PDF with `pdf`, each written whole (drawn in
    memory first); the paths written."""
    fig.tight_layout()
    path = epath.Path(path)
    written = []
    for target, kind in [(path, "png")] + ([(path.with_suffix(".pdf"), "pdf")] if pdf else []):
        drawn = io.BytesIO()
        fig.savefig(drawn, format=kind, dpi=DPI)
        with interrupt.held():
            write_bytes(target, drawn.getvalue())  # local or a bucket
        written.append(str(target))
    plt.close(fig)
    return written


def _fit(text: str, width_inches: float, fontsize: float) -> str:
    """`text` wrapped onto lines that fit `width_inches` at `fontsize` points (a character of
    matplotlib's sans-serif font is at most about 0.6 of its size wide)."""
    return textwrap.fill(text, width=max(20, int(width_inches * 72 / (0.6 * fontsize))))


def _title(ax: Any, text: str) -> None:
    """An axes' title, wrapped to the axes' width."""
    size = matplotlib.rcParams["axes.titlesize"]
    points = matplotlib.font_manager.FontProperties(size=size).get_size_in_points()
    ax.set_title(_fit(text, ax.get_position().width * ax.figure.get_figwidth(), points))


def _integer_ticks(axis: Any) -> None:
    """Ticks on whole numbers only: the axis counts layers, blocks or iterations."""
    axis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(runs: dict[str, list[dict[str, Any]]]) -> Any:
    """Fig. 4 and 6 from {workdir: metrics rows}: training error (thin, dashed) and eval error
    (bold) against iterations; plain networks on the left, residual ones on the right."""
    workdirs = list(runs)
    labels = _labels(workdirs)
    # Networks without shortcuts (plain, VGG) on the left, as in Fig. 4 and 6.
    sides = ["plain" if label.startswith(("plain", "vgg")) else "ResNet" for label in labels]
    panels = [p for p in ("plain", "ResNet") if p in sides]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), sharey=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        runs_here = [i for i, side in enumerate(sides) if side == panel]
        for colour, i in enumerate(runs_here):
            rows = runs[workdirs[i]]
            trained = [(r["step"], _error(r["train_accuracy"])) for r in rows if "train_accuracy" in r]
            evals = [(r["step"], _error(r["eval_accuracy"])) for r in rows if "eval_accuracy" in r]
            style = dict(color=f"C{colour}")
            for points, line in ((trained, dict(linestyle="--", linewidth=0.8)),
                                 (evals, dict(linewidth=2.5))):
                if points:  # a single point drawn as a marker: a line needs two
                    ax.plot(*zip(*points), marker="o" if len(points) == 1 else None, **line, **style)
            ax.plot([], [], linewidth=6, label=labels[i], **style)  # the colour's key
        # The line styles' key, in black: one colour means one network in both styles.
        ax.plot([], [], "k--", linewidth=0.8, label=f"training error ({_values(workdirs, 'train_split')})")
        ax.plot([], [], "k-", linewidth=2.5, label=f"eval error ({_values(workdirs, 'eval_split')})")
        ax.set_xlabel("iterations")
        _integer_ticks(ax.xaxis)
        ax.set_title("plain networks" if panel == "plain" else "ResNets")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 error (%)")
    data = _values(workdirs, "name")
    points = matplotlib.font_manager.FontProperties(
        size=matplotlib.rcParams["figure.titlesize"]).get_size_in_points()
    fig.suptitle(_fit(f"{data}: training error on the {_values(workdirs, 'train_split')} split, "
                      f"eval error on the {_values(workdirs, 'eval_split')} split",
                      fig.get_figwidth(), points))
    return fig


def _eval_images(config, images: int, split: str | None):
    if split:
        config.data.eval_split = split
    return layer_responses.eval_images(config, images)


def responses(workdirs: list[str], images: int,
              split: str | None = None) -> tuple[dict[str, list[float]], int]:
    """Fig. 7's numbers: each run's 3x3-layer response stds, on the first `images` images of
    `split` (default: the run's eval split); and the images there were (a split may hold fewer)."""
    result, counts = {}, []
    for workdir, label in zip(workdirs, _labels(workdirs)):
        config, model, step = layer_responses.load_model(workdir)
        _say(f"{label}: the checkpoint of step {step} of {workdir}")
        batch, _ = _eval_images(config, images, split)
        result[label] = layer_responses.layer_responses(model, batch).tolist()
        counts.append(len(batch))
    return result, min(counts)


def plot_responses(stds: dict[str, list[float]], where: str) -> Any:
    """Fig. 7: std against layer index (top) and sorted by magnitude (bottom); `where`: the
    data set, split and images measured on, for the title."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5))
    for colour, (label, values) in enumerate(stds.items()):
        layers = range(1, len(values) + 1)
        top.plot(layers, values, color=f"C{colour}", label=label)
        bottom.plot(layers, sorted(values, reverse=True), color=f"C{colour}", label=label)
    top.set_xlabel("3x3 layer index (from the input)")
    bottom.set_xlabel("3x3 layer index (sorted by std, largest first)")
    for ax in (top, bottom):
        # The inputs are normalised, so the responses have no physical unit.
        ax.set_ylabel("std of response\n(after BN, before addition, ReLU)")
        _integer_ticks(ax.xaxis)
        ax.legend()
        ax.grid(alpha=0.3)
    _title(top, f"Layer responses: {where}")
    return fig


def lesion(workdirs: list[str], images: int, max_deleted: int, draws: int, seed: int,
           split: str | None = None) -> tuple[dict[str, layer_responses.LesionStudy], int]:
    """The lesion study of each run's latest checkpoint on the first `images` images of `split`
    (default: the run's eval split); and the images there were."""
    studies, counts = {}, []
    for workdir, label in zip(workdirs, _labels(workdirs)):
        config, model, step = layer_responses.load_model(workdir)
        _say(f"{label}: the checkpoint of step {step} of {workdir}")
        batch, labels = _eval_images(config, images, split)
        studies[label] = layer_responses.lesion_study(model, batch, labels, max_deleted=max_deleted,
                                               draws=draws, seed=seed)
        counts.append(len(batch))
    return studies, min(counts)


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


def plot_lesion(studies: dict[str, layer_responses.LesionStudy], where: str) -> tuple[Any, Any]:
    """Veit et al.'s two figures: error against the deleted block, named (down-sampling blocks
    marked with a square, the undeleted network dotted), and error against blocks deleted."""
    blocks_fig, ax = plt.subplots(figsize=(9.5, 4.4))
    names = max((study.names for study in studies.values()), key=len)
    for colour, (label, study) in enumerate(studies.items()):
        style = dict(color=f"C{colour}")
        # A plain block that changes the shape cannot be deleted: a gap in its line.
        ax.plot(range(len(study.single)), [e if e is not None else float("nan") for e in study.single],
                marker=".", label=label, **style)
        down = [(i, e) for i, (e, d) in enumerate(zip(study.single, study.downsamples))
                if e is not None and d]
        if down:
            ax.plot(*zip(*down), linestyle="", marker="s", markersize=8, fillstyle="none", **style)
        ax.axhline(study.baseline, linestyle=":", linewidth=1, **style)
    ax.plot([], [], "ks", fillstyle="none", markersize=8, label="down-sampling block")
    ax.plot([], [], "k:", linewidth=1, label="no block deleted")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_xlabel("block deleted")
    ax.set_ylabel("top-1 eval error (%)")
    _title(ax, f"One block deleted: {where}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the lines fill the axes
    ax.grid(alpha=0.3)

    count_fig, ax = plt.subplots(figsize=(6, 4.4))
    for colour, (label, study) in enumerate(studies.items()):
        ks = list(study.random)
        means = [statistics.mean(study.random[k]) for k in ks]
        spread = [statistics.pstdev(study.random[k]) for k in ks]
        ax.errorbar([0, *ks], [study.baseline, *means], yerr=[0, *spread], marker="o",
                    capsize=3, color=f"C{colour}", label=label)
    draws = sorted({len(errors) for study in studies.values() for errors in study.random.values()})
    ax.errorbar([], [], yerr=[], color="k", capsize=3, linestyle="",
                label=f"mean ± std over {'/'.join(map(str, draws))} random draws")
    ax.set_xlabel("blocks deleted at random")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("top-1 eval error (%)")
    _title(ax, f"Random blocks deleted: {where}")
    ax.legend()
    ax.grid(alpha=0.3)
    return blocks_fig, count_fig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m resnet_jax.report", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="results table of runs")
    table.add_argument("workdirs", nargs="+", help="the runs' workdirs (local or gs://)")
    table.add_argument("--markdown", help="write the Markdown table here (default: print it)")
    table.add_argument("--csv", help="write the CSV table here")
    curves = commands.add_parser("curves", help="training curves (Fig. 4, 6) to a PNG")
    curves.add_argument("workdirs", nargs="+", help="the runs' workdirs (local or gs://)")
    curves.add_argument("--out", required=True, help="the PNG to write")
    resp = commands.add_parser("responses", help="layer responses (Fig. 7) to a PNG")
    resp.add_argument("workdirs", nargs="+", help="the runs' workdirs (local or gs://)")
    resp.add_argument("--out", required=True, help="the PNG to write")
    resp.add_argument("--images", type=int, default=500, help="eval images to measure on")
    resp.add_argument("--json", help="also write the numbers here")
    resp.add_argument("--split", help="the data split to measure on (default: the run's eval split)")
    les = commands.add_parser("lesion", help="lesion study (Veit et al. 2016) of checkpoints")
    les.add_argument("--checkpoint", dest="workdirs", action="append", required=True,
                     help="a run's workdir (its latest checkpoint); repeat for several runs")
    les.add_argument("--out-dir", required=True, help="the directory of its figures and numbers")
    les.add_argument("--images", type=int, default=1000, help="eval images to measure on")
    les.add_argument("--max-deleted", type=int, default=10,
                     help="the most blocks deleted at once (default 10)")
    les.add_argument("--draws", type=int, default=5, help="random draws for each count")
    les.add_argument("--seed", type=int, default=0, help="of the random draws (default 0)")
    les.add_argument("--split", help="the data split to measure on (default: the run's eval split)")
    for figures in (curves, resp, les):
        figures.add_argument("--pdf", action="store_true", help="also write each figure as a PDF")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for workdir in args.workdirs:
        if not (epath.Path(workdir) / "config.json").exists():
            return _fail(f"{workdir} is not a run's workdir (no config.json)")
    if getattr(args, "images", 1) < 1:
        return _fail(f"--images must be a positive number of images; got {args.images}")
    try:
        written = _run(args)
    except (ValueError, FileNotFoundError) as error:
        return _fail(str(error).splitlines()[0])
    for path in written:
        print(f"wrote {path}")
    return 0


def _fail(message: str) -> int:
    print(f"resnet_jax.report: error: {message}", file=sys.stderr)
    return 2


def _write(path: epath.PathLike, text: str) -> str:
    with interrupt.held():
        write_text(epath.Path(path), text)  # a reader never sees half of it
    return str(path)


def _run(args: argparse.Namespace) -> list[str]:
    """Runs the command; the paths of the files it wrote."""
    if args.command in ("table", "curves"):
        runs = runs_with_metrics(args.workdirs)
        if not runs:
            raise ValueError("none of the runs has metrics to report")
    if args.command == "table":
        rows = [table_row(w, r) for w, r in runs.items()]
        written = [_write(args.csv, csv_text(rows))] if args.csv else []
        if args.markdown:
            return [*written, _write(args.markdown, markdown(rows))]
        print(markdown(rows), end="")
        return written
    if args.command == "curves":
        return save(plot_curves(runs), args.out, args.pdf)
    if args.command == "responses":
        stds, images = responses(args.workdirs, args.images, args.split)
        where = f"{_where(args.workdirs, args.split)}, first {images} images"
        written = save(plot_responses(stds, where), args.out, args.pdf)
        return written + ([_write(args.json, json.dumps(stds, indent=1))] if args.json else [])
    studies, images = lesion(args.workdirs, args.images, args.max_deleted, args.draws, args.seed,
                             args.split)
    out_dir = epath.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write(out_dir / "lesion.json",
                      json.dumps({k: dataclasses.asdict(v) for k, v in studies.items()}, indent=1)),
               _write(out_dir / "lesion.md", lesion_markdown(studies))]
    blocks_fig, count_fig = plot_lesion(studies, f"{_where(args.workdirs, args.split)}, first "
                                                 f"{images} images")
    return (written + save(blocks_fig, out_dir / "lesion_blocks.png", args.pdf)
            + save(count_fig, out_dir / "lesion_count.png", args.pdf))


if __name__ == "__main__":
    # What orbax says of the read-only managers that read the runs is not for the reader.
    absl_logging.set_verbosity(absl_logging.ERROR)
    status = main()
    interrupt.done()
    sys.exit(status)
