"""The paper's figures of runs: training curves (Fig. 4, 6), layer responses (Fig. 7) and the
lesion study, drawn with matplotlib into files (PNG, and PDF on request), each written whole."""

import io
import statistics
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a pod or in CI
import matplotlib.font_manager  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from resnet_jax.analysis import layer_responses, tables  # noqa: E402
from resnet_jax.run.paths import write_bytes  # noqa: E402
from resnet_jax.training import interrupt  # noqa: E402


DPI = 200


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
    labels = tables.labels(workdirs)
    # Networks without shortcuts (plain, VGG) on the left, as in Fig. 4 and 6.
    sides = ["plain" if label.startswith(("plain", "vgg")) else "ResNet" for label in labels]
    panels = [p for p in ("plain", "ResNet") if p in sides]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), sharey=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        runs_here = [i for i, side in enumerate(sides) if side == panel]
        for colour, i in enumerate(runs_here):
            rows = runs[workdirs[i]]
            trained = [(r["step"], tables.error_percent(r["train_accuracy"])) for r in rows if "train_accuracy" in r]
            evals = [(r["step"], tables.error_percent(r["eval_accuracy"])) for r in rows if "eval_accuracy" in r]
            style = dict(color=f"C{colour}")
            for points, line in ((trained, dict(linestyle="--", linewidth=0.8)),
                                 (evals, dict(linewidth=2.5))):
                if points:  # a single point drawn as a marker: a line needs two
                    ax.plot(*zip(*points), marker="o" if len(points) == 1 else None, **line, **style)
            ax.plot([], [], linewidth=6, label=labels[i], **style)  # the colour's key
        # The line styles' key, in black: one colour means one network in both styles.
        ax.plot([], [], "k--", linewidth=0.8, label=f"training error ({tables.data_values(workdirs, 'train_split')})")
        ax.plot([], [], "k-", linewidth=2.5, label=f"eval error ({tables.data_values(workdirs, 'eval_split')})")
        ax.set_xlabel("iterations")
        _integer_ticks(ax.xaxis)
        ax.set_title("plain networks" if panel == "plain" else "ResNets")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 error (%)")
    data = tables.data_values(workdirs, "name")
    points = matplotlib.font_manager.FontProperties(
        size=matplotlib.rcParams["figure.titlesize"]).get_size_in_points()
    fig.suptitle(_fit(f"{data}: training error on the {tables.data_values(workdirs, 'train_split')} split, "
                      f"eval error on the {tables.data_values(workdirs, 'eval_split')} split",
                      fig.get_figwidth(), points))
    return fig


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
