"""Expands a sweep into one run per point, then runs, launches or prints the runs:

    python -m launch.sweep --sweep=configs/sweep_table2.py --workdir=BASE \
        [--mode=local|tpu|slurm] [--dry-run] [--config.FIELD=VALUE ...]

A sweep is a config file (a path, or the name of a shipped one: `--sweep=sweep_table2`) with two
functions:

    get_config(arg=None)  the base config: the sweep file is itself a config that main can train;
    get_sweep()           the points, a list of dicts from dotted config fields to values, e.g.
                          {"model.name": "plain18", "model.shortcut": "A"}. The key "config" gives
                          another config file, with its argument, instead of the base; configs
                          built from arguments need it: {"config": "configs/cifar.py:depth=110"}
                          sets the model and ResNet-110's warmup together.

Each run trains in BASE/NAME, NAME made from its point: a field by its last part (its whole dotted
name where two fields of the sweep end alike) and value, a name field (model.name, data.name) by
its value alone, a "config" by the file's stem and its argument; {"model.name": "plain18",
"model.shortcut": "A"} -> plain18_shortcut-A, {"config": "configs/cifar.py:depth=56,plain=True"}
-> cifar_depth-56_plain-True.

--config.FIELD=VALUE flags apply to every run (e.g. fewer steps); they may not set a swept field.
Every point is checked against its config before anything runs: a field that does not exist stops
the sweep with one line and exit status 2.

Modes: local runs the main command of each run in turn (a run whose workdir holds a run resumes
it, or finds it finished); tpu runs `python -m launch.tpu_pod --wait` for each run in turn on one
pod slice, installing the project with the first (each run goes on on the workers if the
connection drops, and the next one then refuses to start beside it); slurm submits
launch/slurm.sbatch once per run.
--dry-run prints one line per run, name, workdir and command separated by tabs, and runs nothing.
"""

import argparse
import dataclasses
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from resnet_jax.cli import config_files

CONFIG_KEY = "config"
SLURM_SCRIPT = str(Path(__file__).with_name("slurm.sbatch"))  # in the repository or installed


class SweepError(Exception):
    """A sweep that cannot run as written; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    workdir: str
    config: str                            # the --config argument: FILE[:ARG]
    overrides: tuple[tuple[str, str], ...]  # (dotted field, command-line value)

    def main_flags(self) -> list[str]:
        return [f"--config={self.config}", f"--workdir={self.workdir}",
                *(f"--config.{field}={value}" for field, value in self.overrides)]


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def load_config(spec: str):
    """The config of FILE[:ARG], as main would build it."""
    try:
        path, _, arg = config_files.resolve(spec).partition(":")
        get_config = runpy.run_path(path).get("get_config")
        if get_config is None:
            raise SweepError(f"{path} defines no get_config()")
        return get_config(arg) if arg else get_config()
    except SweepError:
        raise
    except Exception as error:
        raise SweepError(f"config {spec!r} does not load: {_one_line(error)}") from None


def check_field(config, field: str, value: Any = None, set_value: bool = False) -> None:
    """Raises SweepError unless `field` names a field of `config`; with set_value, also sets it
    (ml_collections refuses a value of the wrong type)."""
    *sections, leaf = field.split(".")
    node = config
    for depth, key in enumerate([*sections, leaf]):
        if not hasattr(node, "keys") or key not in node:
            known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
            raise SweepError(f"config field {'.'.join(field.split('.')[:depth + 1])!r} does not exist "
                             f"(fields there: {known})")
        parent, node = node, node[key]
    if hasattr(node, "keys"):
        raise SweepError(f"config field {field!r} is a section; name one of its fields")
    if set_value:
        try:
            setattr(parent, leaf, value)
        except Exception as error:
            raise SweepError(f"config field {field!r} cannot be {value!r}: {_one_line(error)}") from None


def flag_value(value: Any) -> str:
    """`value` as main's --config.FIELD=VALUE parses it back."""
    if isinstance(value, (str, bool, int, float)):
        return str(value)
    if isinstance(value, (tuple, list)):
        return str(tuple(value))
    raise SweepError(f"{value!r} cannot be written as a command-line value")


def _label(text: str) -> str:
    """Filesystem-safe: letters, digits and . _ + - only, never a leading dot."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-").lstrip(".") or "-"


def _config_label(spec: str) -> str:
    path, _, arg = str(spec).partition(":")
    items = [item.replace("=", "-", 1) for item in arg.split(",") if item]
    return "_".join(_label(part) for part in [Path(path).stem, *items])


def run_names(points: list[dict]) -> list[str]:
    """One readable name per point, in the order its keys are written."""
    fields = {key for point in points for key in point if key != CONFIG_KEY}
    endings = [field.rsplit(".", 1)[-1] for field in fields]
    short = {field: field.rsplit(".", 1)[-1] for field in fields
             if endings.count(field.rsplit(".", 1)[-1]) == 1}
    names = []
    for point in points:
        parts = [_config_label(value) if key == CONFIG_KEY else _label(flag_value(value))
                 if key.rsplit(".", 1)[-1] == "name" else  # a name says what it is
                 f"{_label(short.get(key, key))}-{_label(flag_value(value))}" for key, value in point.items()]
        names.append("_".join(parts) or "base")
    return names


def _parse_overrides(flags: list[str]) -> dict[str, str]:
    overrides = {}
    for flag in flags:
        field, equals, value = flag[len("--config."):].partition("=")
        if not equals:
            raise SweepError(f"config overrides take the form --config.FIELD=VALUE; got {flag}")
        overrides[field] = value
    return overrides


def expand(sweep_file: str, base_workdir: str, extra_flags: list[str] = ()) -> list[Run]:
    """The runs of a sweep, each point checked against its config; SweepError if any is wrong."""
    try:
        module = runpy.run_path(config_files.resolve(sweep_file))
        get_sweep = module.get("get_sweep")
        if not (callable(get_sweep) and callable(module.get("get_config"))):
            raise SweepError(f"{sweep_file} is not a sweep file: it must define get_config() and get_sweep()")
        points = get_sweep()
    except SweepError:
        raise
    except Exception as error:
        raise SweepError(f"{sweep_file} does not load: {_one_line(error)}") from None
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
        raise SweepError(f"{sweep_file}: get_sweep() must return a non-empty list of dicts")
    extras = _parse_overrides(list(extra_flags))
    names = run_names(points)
    seen = {}
    for index, name in enumerate(names):
        if name in seen:
            raise SweepError(f"{sweep_file}: points {seen[name]} and {index} both make the run name {name!r}")
        seen[name] = index

    runs = []
    for index, (point, name) in enumerate(zip(points, names)):
        spec = point.get(CONFIG_KEY, sweep_file)
        where = f"{sweep_file} point {index} ({name})"
        if not isinstance(spec, str):
            raise SweepError(f"{where}: {CONFIG_KEY!r} must be a string FILE[:ARG]; got {spec!r}")
        fields = {k: v for k, v in point.items() if k != CONFIG_KEY}
        try:
            config = load_config(spec)
            for field, value in fields.items():
                check_field(config, field, value, set_value=True)
            for field in extras:
                if field in fields:
                    raise SweepError(f"--config.{field} is swept over; it cannot also be set for every run")
                check_field(config, field)
            overrides = tuple((f, flag_value(v)) for f, v in fields.items()) + tuple(extras.items())
        except SweepError as error:
            raise SweepError(f"{where}: {error}") from None
        runs.append(Run(name, f"{base_workdir.rstrip('/')}/{name}", spec, overrides))
    return runs


def commands(runs: list[Run], args: argparse.Namespace) -> list[list[str]]:
    """The command that runs, launches or submits each run, in order."""
    if args.mode == "local":
        return [[sys.executable, "-m", "resnet_jax.main", *run.main_flags()] for run in runs]
    if args.mode == "tpu":
        pod = [f"--tpu={args.tpu}", f"--zone={args.zone}"]
        pod += [f"--{name}={getattr(args, name)}" for name in ("project", "repo", "ref") if getattr(args, name)]
        # One pod slice, runs in turn: the first run installs the project, the others reuse it;
        # each launch waits for its run to end before the next starts.
        return [[sys.executable, "-m", "launch.tpu_pod", *pod, "--wait", *([] if index == 0 else ["--no-install"]),
                 *run.main_flags()] for index, run in enumerate(runs)]
    sbatch = shlex.split(args.sbatch_args or "")
    sbatch += [f"--nodes={args.nodes}"] if args.nodes else []
    sbatch += [f"--gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []
    return [["sbatch", f"--job-name={run.name}", *sbatch, SLURM_SCRIPT, *run.main_flags()] for run in runs]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
                                     epilog="Any --config.FIELD=VALUE applies to every run.")
    parser.add_argument("--sweep", required=True, help="the sweep file, e.g. configs/sweep_table6.py")
    parser.add_argument("--workdir", required=True, help="base directory: run NAME trains in BASE/NAME")
    parser.add_argument("--mode", choices=("local", "tpu", "slurm"), default="local")
    parser.add_argument("--dry-run", action="store_true", help="print one line per run, run nothing")
    tpu = parser.add_argument_group("tpu mode (see launch/tpu_pod.py)")
    tpu.add_argument("--tpu", help="TPU VM (pod slice) name")
    tpu.add_argument("--zone")
    tpu.add_argument("--project")
    tpu.add_argument("--repo", help="git URL the workers clone instead of a copy of this checkout")
    tpu.add_argument("--ref", help="commit or branch of --repo")
    slurm = parser.add_argument_group("slurm mode (see launch/slurm.sbatch)")
    slurm.add_argument("--nodes", type=int)
    slurm.add_argument("--gpus_per_node", type=int, help="sbatch --gpus-per-node (one process per node uses them all)")
    slurm.add_argument("--sbatch_args", help='more sbatch options, e.g. "--partition=gpu --time=24:00:00"')
    config_flags = [a for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.mode == "tpu" and not (args.tpu and args.zone):
        parser.error("--mode=tpu needs --tpu and --zone")
    return args, config_flags


def main(argv: list[str]) -> int:
    args, config_flags = parse_args(argv)
    try:
        if args.mode == "tpu" and not args.workdir.startswith("gs://"):
            raise SweepError(f"--mode=tpu needs a gs:// --workdir that all workers share; got {args.workdir!r}")
        runs = expand(args.sweep, args.workdir, config_flags)
    except SweepError as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return 2
    planned = commands(runs, args)
    if args.dry_run:
        for run, command in zip(runs, planned):
            print(f"{run.name}\t{run.workdir}\t{shlex.join(command)}")
        return 0
    failed = []
    for index, (run, command) in enumerate(zip(runs, planned), 1):
        print(f"[{index}/{len(runs)}] {run.name}: {shlex.join(command)}", flush=True)
        if subprocess.run(command).returncode:
            failed.append(run.name)
    if failed:
        print(f"sweep: {len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
