"""Reports runs as the paper does: a results table, training curves, layer responses.

    python -m resnet_jax.report table WORKDIR... [--markdown FILE] [--csv FILE]
    python -m resnet_jax.report curves WORKDIR... --out FILE.png
    python -m resnet_jax.report responses WORKDIR... --out FILE.png [--images N] [--json FILE]
    python -m resnet_jax.report lesion --checkpoint WORKDIR [--checkpoint ...] --out-dir DIR

`table`: one row per run (final and best eval error, parameters, multiply-adds, training
images/s) beside the paper's error where the paper has one (Tables 2, 3, 6). `curves`: Fig. 4
and 6, training error thin and dashed, eval error bold, one colour per network, plain nets and
ResNets in two panels. `responses`: Fig. 7, the standard deviation of each 3x3 layer's response,
in depth order and sorted by magnitude. `lesion`: Veit, Wilber and Belongie 2016, the eval
error with each single block deleted and with k random blocks deleted (lesion.md, lesion.json,
lesion_blocks.png, lesion_count.png).
"""

import argparse
import csv
import dataclasses
import io
import json
import statistics
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a pod or in CI
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402

from resnet_jax import analysis, flops, metrics  # noqa: E402

# Top-1 error (%) the paper reports. ImageNet: validation, 10-crop testing (Table 2: plain and
# option A ResNets; Table 3: options A/B/C and the bottleneck nets, B). CIFAR-10: test (Table 6).
PAPER_ERRORS = {
    ("plain18", None): 27.94, ("plain34", None): 28.54,
    ("resnet18", "A"): 27.88, ("resnet34", "A"): 25.03, ("resnet34", "B"): 24.52,
    ("resnet34", "C"): 24.19, ("resnet50", "B"): 22.85, ("resnet101", "B"): 21.75,
    ("resnet152", "B"): 21.43,
    ("cifar_resnet20", "A"): 8.75, ("cifar_resnet32", "A"): 7.51, ("cifar_resnet44", "A"): 7.17,
    ("cifar_resnet56", "A"): 6.97, ("cifar_resnet110", "A"): 6.43, ("cifar_resnet1202", "A"): 7.93,
}

COLUMNS = ("run", "model", "shortcut", "steps", "final_error", "best_error", "paper_error",
           "parameters", "multiply_adds", "images_per_second")


def paper_error(model_name: str, shortcut: str | None, block_order: str = "post",
                gate: str = "none") -> float | None:
    """The paper's error for the network it trained: post-activation blocks, no gates."""
    if block_order != "post" or gate != "none":
        return None
    plain = "plain" in model_name
    return PAPER_ERRORS.get((model_name, None if plain else shortcut))


def display_name(model_name: str) -> str:
    """The paper's names: cifar_plain20 -> plain-20, resnet34 -> ResNet-34."""
    name = model_name.removeprefix("cifar_")
    for family, shown in (("resnet", "ResNet-"), ("plain", "plain-")):
        if name.startswith(family) and name[len(family):].isdigit():
            return shown + name[len(family):]
    return model_name


def _error(accuracy: float) -> float:
    return 100.0 * (1.0 - accuracy)


def table_row(workdir: str) -> dict[str, Any]:
    """A run's results from its workdir: metrics.jsonl, config.json and the model it names."""
    config, model, _ = analysis.load_model(workdir)
    rows = metrics.read_rows(workdir)
    evals = [row for row in rows if "eval_accuracy" in row]
    speeds = [row["images_per_second"] for row in rows if "images_per_second" in row]
    name, shortcut = config.model.name, config.model.get("shortcut")
    # The paper's errors are on the test set (CIFAR) and the validation set (ImageNet), not on a
    # split held out of the training set.
    held_out = config.data.eval_split.startswith("train")
    return {
        "run": epath.Path(workdir).name, "model": display_name(name),
        "shortcut": "-" if "plain" in name or shortcut is None else shortcut,
        "steps": max((row["step"] for row in rows), default=0),
        "final_error": _error(evals[-1]["eval_accuracy"]) if evals else None,
        "best_error": min(_error(row["eval_accuracy"]) for row in evals) if evals else None,
        "paper_error": None if held_out else paper_error(
            name, shortcut, config.model.get("block_order", "post"), config.model.get("gate", "none")),
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


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ("run", "model", "shortcut", "steps", "final error (%)", "best error (%)",
              "paper error (%)", "parameters", "multiply-adds", "train images/s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _labels(workdirs: list[str]) -> list[str]:
    """The paper's name of each run's network; with the workdir's name where two runs share one."""
    names = [display_name(analysis.load_config(w).model.name) for w in workdirs]
    return [name if names.count(name) == 1 else f"{name} ({epath.Path(w).name})"
            for w, name in zip(workdirs, names)]


def _save(fig: Any, axes: list[Any], path: str) -> None:
    """Legend and grid on each of `axes`, then the figure to `path` (PNG)."""
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with epath.Path(path).open("wb") as f:  # local or a bucket
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def plot_curves(workdirs: list[str], out: str) -> None:
    """Fig. 4 and 6: training error (thin, dashed) and eval error (bold) against iterations;
    plain networks on the left, residual ones on the right, when both are present."""
    labels = _labels(workdirs)
    # Networks without shortcuts (plain, VGG) on the left, as in Fig. 4 and 6.
    sides = ["plain" if label.startswith(("plain", "vgg")) else "ResNet" for label in labels]
    panels = [p for p in ("plain", "ResNet") if p in sides]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), sharey=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        runs = [i for i, side in enumerate(sides) if side == panel]
        for colour, i in enumerate(runs):
            rows = metrics.read_rows(workdirs[i])
            train = [(r["step"], _error(r["train_accuracy"])) for r in rows if "train_accuracy" in r]
            evals = [(r["step"], _error(r["eval_accuracy"])) for r in rows if "eval_accuracy" in r]
            style = dict(color=f"C{colour}")
            if train:
                ax.plot(*zip(*train), linestyle="--", linewidth=0.8, **style)
            if evals:
                ax.plot(*zip(*evals), linewidth=2.5, label=labels[i], **style)
        ax.set_xlabel("iteration")
        ax.set_title(panel)
    axes[0][0].set_ylabel("error (%)   (dashed: training, bold: eval)")
    _save(fig, axes[0], out)


def _eval_images(config, images: int, split: str | None):
    if split:
        config.data.eval_split = split
    return analysis.eval_images(config, images)


def responses(workdirs: list[str], images: int, split: str | None = None) -> dict[str, list[float]]:
    """Fig. 7's numbers: each run's 3x3-layer response stds, on the first `images` images of
    `split` (default: the run's eval split)."""
    result = {}
    for workdir, label in zip(workdirs, _labels(workdirs)):
        config, model, _ = analysis.load_model(workdir)
        batch, _ = _eval_images(config, images, split)
        result[label] = analysis.layer_responses(model, batch).tolist()
    return result


def plot_responses(stds: dict[str, list[float]], out: str) -> None:
    """Fig. 7: std against layer index (top) and sorted by magnitude (bottom)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5))
    for colour, (label, values) in enumerate(stds.items()):
        top.plot(range(1, len(values) + 1), values, color=f"C{colour}", label=label)
        bottom.plot(range(1, len(values) + 1), sorted(values, reverse=True), color=f"C{colour}",
                    label=label)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
    _save(fig, [top, bottom], out)


def lesion(workdirs: list[str], images: int, max_deleted: int, draws: int, seed: int,
           split: str | None = None) -> dict[str, analysis.LesionStudy]:
    """The lesion study of each run's latest checkpoint on the first `images` images of `split`
    (default: the run's eval split)."""
    studies = {}
    for workdir, label in zip(workdirs, _labels(workdirs)):
        config, model, _ = analysis.load_model(workdir)
        batch, labels = _eval_images(config, images, split)
        studies[label] = analysis.lesion_study(model, batch, labels, max_deleted=max_deleted,
                                               draws=draws, seed=seed)
    return studies


def lesion_markdown(studies: dict[str, analysis.LesionStudy]) -> str:
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


def plot_lesion(studies: dict[str, analysis.LesionStudy], out_dir: str) -> None:
    """Veit et al.'s two figures: error against the deleted block's index (down-sampling blocks
    marked with a square, the undeleted network dotted), and error against blocks deleted."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for colour, (label, study) in enumerate(studies.items()):
        style = dict(color=f"C{colour}")
        points = [(i, e) for i, e in enumerate(study.single, 1) if e is not None]
        ax.plot(*zip(*points), marker=".", label=label, **style)
        down = [(i, e) for i, e in enumerate(study.single, 1) if e is not None and study.downsamples[i - 1]]
        if down:
            ax.plot(*zip(*down), linestyle="", marker="s", markersize=8, fillstyle="none", **style)
        ax.axhline(study.baseline, linestyle=":", linewidth=1, **style)
    ax.set_xlabel("deleted block (squares: down-sampling)")
    ax.set_ylabel("eval error (%)")
    _save(fig, [ax], epath.Path(out_dir) / "lesion_blocks.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for colour, (label, study) in enumerate(studies.items()):
        ks = list(study.random)
        means = [statistics.mean(study.random[k]) for k in ks]
        spread = [statistics.pstdev(study.random[k]) for k in ks]
        ax.errorbar([0, *ks], [study.baseline, *means], yerr=[0, *spread], marker="o",
                    capsize=3, color=f"C{colour}", label=label)
    ax.set_xlabel("blocks deleted at random")
    ax.set_ylabel("eval error (%)")
    _save(fig, [ax], epath.Path(out_dir) / "lesion_count.png")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m resnet_jax.report", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="results table of runs")
    table.add_argument("workdirs", nargs="+")
    table.add_argument("--markdown", help="write the Markdown table here (default: print it)")
    table.add_argument("--csv", help="write the CSV table here")
    curves = commands.add_parser("curves", help="training curves (Fig. 4, 6) to a PNG")
    curves.add_argument("workdirs", nargs="+")
    curves.add_argument("--out", required=True)
    resp = commands.add_parser("responses", help="layer responses (Fig. 7) to a PNG")
    resp.add_argument("workdirs", nargs="+")
    resp.add_argument("--out", required=True)
    resp.add_argument("--images", type=int, default=500, help="eval images to measure on")
    resp.add_argument("--json", help="also write the numbers here")
    resp.add_argument("--split", help="the data split to measure on (default: the run's eval split)")
    les = commands.add_parser("lesion", help="lesion study (Veit et al. 2016) of checkpoints")
    les.add_argument("--checkpoint", dest="workdirs", action="append", required=True,
                     help="a run's workdir (its latest checkpoint); repeat for several runs")
    les.add_argument("--out-dir", required=True)
    les.add_argument("--images", type=int, default=1000, help="eval images to measure on")
    les.add_argument("--max-deleted", type=int, default=10)
    les.add_argument("--draws", type=int, default=5, help="random draws for each count")
    les.add_argument("--seed", type=int, default=0)
    les.add_argument("--split", help="the data split to measure on (default: the run's eval split)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for workdir in args.workdirs:
        if not (epath.Path(workdir) / "config.json").exists():
            return _fail(f"{workdir} is not a run's workdir (no config.json)")
    if getattr(args, "images", 1) < 1:
        return _fail(f"--images must be a positive number of images; got {args.images}")
    try:
        _run(args)
    except (ValueError, FileNotFoundError) as error:
        return _fail(str(error).splitlines()[0])
    return 0


def _fail(message: str) -> int:
    print(f"resnet_jax.report: error: {message}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> None:
    if args.command == "table":
        rows = [table_row(w) for w in args.workdirs]
        if args.csv:
            epath.Path(args.csv).write_text(csv_text(rows))
        if args.markdown:
            epath.Path(args.markdown).write_text(markdown(rows))
        else:
            print(markdown(rows), end="")
    elif args.command == "curves":
        plot_curves(args.workdirs, args.out)
    elif args.command == "responses":
        stds = responses(args.workdirs, args.images, args.split)
        plot_responses(stds, args.out)
        if args.json:
            epath.Path(args.json).write_text(json.dumps(stds, indent=1))
    elif args.command == "lesion":
        studies = lesion(args.workdirs, args.images, args.max_deleted, args.draws, args.seed,
                         args.split)
        out_dir = epath.Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "lesion.json").write_text(
            json.dumps({k: dataclasses.asdict(v) for k, v in studies.items()}, indent=1))
        (out_dir / "lesion.md").write_text(lesion_markdown(studies))
        plot_lesion(studies, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
