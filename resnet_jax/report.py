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
import dataclasses  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

from absl import logging as absl_logging  # noqa: E402
from etils import epath  # noqa: E402

from resnet_jax.analysis import figures, layer_responses, tables  # noqa: E402
from resnet_jax.cli import flags as cli_flags  # noqa: E402
from resnet_jax.run import jsonl  # noqa: E402
from resnet_jax.run.paths import write_text  # noqa: E402


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
        path = epath.Path(workdir) / jsonl.JSONL
        try:
            rows = jsonl.read_rows(workdir) if path.exists() else None
        except ValueError as error:
            _warn(f"skipping {workdir}: {error}")
            continue
        if rows:
            found[workdir] = rows
        else:
            _warn(f"skipping {workdir}: {'metrics.jsonl is empty' if rows == [] else 'no metrics.jsonl'}")
    return found


def _eval_images(config, images: int, split: str | None):
    if split:
        config.data.eval_split = split
    return layer_responses.eval_images(config, images)


def responses(workdirs: list[str], images: int,
              split: str | None = None) -> tuple[dict[str, list[float]], int]:
    """Fig. 7's numbers: each run's 3x3-layer response stds, on the first `images` images of
    `split` (default: the run's eval split); and the images there were (a split may hold fewer)."""
    result, counts = {}, []
    for workdir, label in zip(workdirs, tables.labels(workdirs)):
        config, model, step = layer_responses.load_model(workdir)
        _say(f"{label}: the checkpoint of step {step} of {workdir}")
        batch, _ = _eval_images(config, images, split)
        result[label] = layer_responses.layer_responses(model, batch).tolist()
        counts.append(len(batch))
    return result, min(counts)


def lesion(workdirs: list[str], images: int, max_deleted: int, draws: int, seed: int,
           split: str | None = None) -> tuple[dict[str, layer_responses.LesionStudy], int]:
    """The lesion study of each run's latest checkpoint on the first `images` images of `split`
    (default: the run's eval split); and the images there were."""
    studies, counts = {}, []
    for workdir, label in zip(workdirs, tables.labels(workdirs)):
        config, model, step = layer_responses.load_model(workdir)
        _say(f"{label}: the checkpoint of step {step} of {workdir}")
        batch, labels = _eval_images(config, images, split)
        studies[label] = layer_responses.lesion_study(model, batch, labels, max_deleted=max_deleted,
                                                      draws=draws, seed=seed)
        counts.append(len(batch))
    return studies, min(counts)


def _parser() -> argparse.ArgumentParser:
    parser = cli_flags.ArgumentParser(prog="python -m resnet_jax.report",
                                      description=__doc__.split("\n")[0])
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
    for drawing in (curves, resp, les):
        drawing.add_argument("--pdf", action="store_true", help="also write each figure as a PDF")
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
    cli_flags.say_error(message)
    return cli_flags.BAD_INPUT


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
        rows = [tables.table_row(w, r) for w, r in runs.items()]
        written = [_write(args.csv, tables.csv_text(rows))] if args.csv else []
        if args.markdown:
            return [*written, _write(args.markdown, tables.markdown(rows))]
        print(tables.markdown(rows), end="")
        return written
    if args.command == "curves":
        return figures.save(figures.plot_curves(runs), args.out, args.pdf)
    if args.command == "responses":
        stds, images = responses(args.workdirs, args.images, args.split)
        where = f"{tables.measured_on(args.workdirs, args.split)}, first {images} images"
        written = figures.save(figures.plot_responses(stds, where), args.out, args.pdf)
        return written + ([_write(args.json, json.dumps(stds, indent=1))] if args.json else [])
    studies, images = lesion(args.workdirs, args.images, args.max_deleted, args.draws, args.seed,
                             args.split)
    out_dir = epath.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write(out_dir / "lesion.json",
                      json.dumps({k: dataclasses.asdict(v) for k, v in studies.items()}, indent=1)),
               _write(out_dir / "lesion.md", tables.lesion_markdown(studies))]
    where = f"{tables.measured_on(args.workdirs, args.split)}, first {images} images"
    blocks_fig, count_fig = figures.plot_lesion(studies, where)
    return (written + figures.save(blocks_fig, out_dir / "lesion_blocks.png", args.pdf)
            + figures.save(count_fig, out_dir / "lesion_count.png", args.pdf))


if __name__ == "__main__":
    # What orbax says of the read-only managers that read the runs is not for the reader.
    absl_logging.set_verbosity(absl_logging.ERROR)
    status = main()
    interrupt.done()
    sys.exit(status)
