"""Runs the main job on every worker of a Cloud TPU pod slice, from your own machine:

    python -m launch.tpu_pod --tpu=NAME --zone=ZONE [--project=PROJECT] \
        --workdir=gs://BUCKET/runs/resnet50 --config=configs/resnet50.py [--config.x=y ...] [--dry-run]

First it installs the project on all workers: the committed tree of this checkout (`git archive
HEAD`), or with --repo=URL a clone of that repository at --ref (default: this checkout's commit),
into ~/resnet_jax; then a Python 3.11 environment, ~/resnet_jax_venv, made by uv (the TPU VM
images' own Python is 3.10, older than the project needs), with `-r requirements.txt -e .` and
`jax[tpu]` at the version requirements.txt pins. Then every worker starts the same main command
from the copy's root in that environment; JAX joins the workers into one program. --no-install
skips the first part. A --config file that the committed tree does not hold as it is (a file of
your own, untracked, changed, or outside the checkout) is copied to every worker as
~/resnet_jax/launched_config.py and run from there. The launcher says which commit the workers
run, and which config file it copied. --dry-run prints each command and runs none.

The run does not depend on the SSH session that starts it: each worker runs it in a session of
its own, its output appended to ~/resnet_jax.log, its process id in ~/resnet_jax.pid and, once
it ends, its exit status in ~/resnet_jax.status. The launcher returns once it has started, and
prints how to watch the run (process 0's log; TensorBoard on the workdir) and how to stop it: a
SIGTERM to one worker's process stops all of them after they save the same step, exit status 75
(then the same command resumes it). --wait stays until the run has ended on every worker and
exits with its status, as launch.sweep uses it to run one run after another. A worker that
still runs a launched run refuses to start another.
"""

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# On each worker, in the login's home directory (where a command over SSH starts): the copy of
# the project, its Python environment, and the run's output, process id and exit status.
REMOTE_DIR = "resnet_jax"
VENV = "resnet_jax_venv"
LOG, PID, STATUS = "resnet_jax.log", "resnet_jax.pid", "resnet_jax.status"
# The Python the project is tested on (pyproject.toml: requires-python >= 3.11).
PYTHON_VERSION = "3.11"
# On each worker, in the copy's root: a --config file that is not committed, copied there.
SHIPPED_CONFIG = "launched_config.py"


def _fail(message: str) -> None:
    print(f"tpu_pod: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's own flags, and the --config.x=y overrides that go to the main job as they are."""
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(prog="python -m launch.tpu_pod", description=__doc__.split("\n\n")[0],
                                     epilog="Any --config.FIELD=VALUE is passed to the main job.")
    parser.add_argument("--tpu", required=True, help="the TPU VM (pod slice) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
    parser.add_argument("--workdir", required=True, help="gs://BUCKET/PATH, shared by all workers")
    parser.add_argument("--config", required=True, help="config file, relative to the repo root, [:ARG]")
    parser.add_argument("--repo", help="git URL to clone on the workers instead of copying this checkout")
    parser.add_argument("--ref", help="commit or branch of --repo (default: this checkout's commit)")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="the workers already have the project and its environment")
    parser.add_argument("--wait", action="store_true",
                        help="stay until the run ends on every worker and exit with its status "
                             "(the run itself goes on if this connection drops)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if any("=" not in o for o in overrides):
        _fail(f"config overrides take the form --config.FIELD=VALUE; got {next(o for o in overrides if '=' not in o)}")
    # Each worker has its own disk: checkpoints and metrics must go where all of them write and read.
    if not args.workdir.startswith("gs://"):
        _fail(f"--workdir must be a gs:// path that all workers share; got {args.workdir!r}")
    return args, overrides


def _gcloud(verb: str, args: argparse.Namespace, *operands: str, worker: str = "all") -> list[str]:
    project = [f"--project={args.project}"] if args.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *operands, f"--zone={args.zone}", *project,
            f"--worker={worker}"]


def on_all_workers(args: argparse.Namespace, remote_command: str) -> list[str]:
    return _gcloud("ssh", args, args.tpu) + [f"--command={remote_command}"]


def _jax_tpu_requirement() -> str:
    """jax[tpu] at the version requirements.txt pins, so libtpu matches the tested jax."""
    pinned = re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    return f"jax[tpu]=={pinned.group(1)}" if pinned else "jax[tpu]"


def _local_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def environment_setup() -> str:
    """The remote commands, run in the copy's root, that make ~/VENV a Python PYTHON_VERSION
    environment with the project installed. The images' Python (3.10 on the Cloud TPU VM
    images) is too old, and Cloud TPU's pages install jax[tpu] into it. uv, as Google's TPU
    projects install (MaxText: `uv venv --python`; vLLM TPU), brings its own CPython build:
    the same on every image, no sudo, apt or third-party repository; it installs from PyPI
    through pip into the login's own site."""
    python = f"~/{VENV}/bin/python"
    return (f"python3 -m pip install --user --quiet --upgrade uv"
            f" && python3 -m uv venv --allow-existing --python {PYTHON_VERSION} ~/{VENV}"
            f" && python3 -m uv pip install --python {python} -r requirements.txt -e ."
            f" {shlex.quote(_jax_tpu_requirement())}")


def install_commands(args: argparse.Namespace) -> list[list[str]]:
    """Put the project on every worker and install it with its pinned requirements."""
    cd = f"cd {REMOTE_DIR}"
    if args.repo:
        ref = shlex.quote(args.ref or _local_commit())
        fetch = (f"(test -d {REMOTE_DIR}/.git || git clone {shlex.quote(args.repo)} {REMOTE_DIR}) && {cd} "
                 # FETCH_HEAD, not the ref by name: a branch already checked out on a worker
                 # from an earlier launch would otherwise stay at its old commit.
                 f"&& git fetch --quiet origin {ref} && git checkout --quiet --force --detach FETCH_HEAD")
        return [on_all_workers(args, f"{fetch} && {environment_setup()}")]
    # Only committed files travel: the pod runs a known commit, not half-edited local files.
    archive = str(Path(tempfile.gettempdir()) / "resnet_jax_launch.tar.gz")
    unpack = f"mkdir -p {REMOTE_DIR} && tar -xzf resnet_jax_launch.tar.gz -C {REMOTE_DIR} && {cd}"
    return [["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
            _gcloud("scp", args, archive, f"{args.tpu}:resnet_jax_launch.tar.gz"),
            on_all_workers(args, f"{unpack} && {environment_setup()}")]


def _git(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True)


def config_to_ship(config: str) -> Path | None:
    """The local file of --config (FILE.py[:ARG]) where the workers' copy of the committed tree
    does not hold it as it is: untracked, changed since HEAD, or outside this checkout; None for
    a committed file or a shipped config's name. A file that does not exist is refused."""
    name = config.partition(":")[0]
    if not name.endswith(".py"):
        return None  # a shipped config by name: in every copy
    path = Path(name).expanduser()
    path = next((p for p in (path, REPO / path) if p.is_file()), None) if not path.is_absolute() \
        else (path if path.is_file() else None)
    if path is None:
        _fail(f"--config: {name} is not a file (here or in {REPO})")
    try:
        relative = path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path  # outside the checkout
    committed = (_git("cat-file", "-e", f"HEAD:{relative}").returncode == 0
                 and _git("diff", "--quiet", "HEAD", "--", relative).returncode == 0)
    return None if committed else path


def ship_config_command(args: argparse.Namespace, path: Path) -> list[str]:
    """Copies the config file `path` into every worker's copy of the project."""
    return _gcloud("scp", args, str(path), f"{args.tpu}:{REMOTE_DIR}/{SHIPPED_CONFIG}")


def main_argv(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The main command every worker runs, from the copy's root (configs import configs/)."""
    config = args.config
    if config_to_ship(config) is not None:
        _, colon, arg = config.partition(":")
        config = f"{SHIPPED_CONFIG}{colon}{arg}"
    return ["-m", "resnet_jax.main", f"--config={config}", f"--workdir={args.workdir}", *overrides]


def revision(args: argparse.Namespace) -> str:
    """Which code the workers run, in a line."""
    if args.repo:
        code = f"{args.ref or _local_commit()} of {args.repo}"
    elif args.install:
        dirty = _git("status", "--porcelain", "--untracked-files=no").stdout
        code = f"commit {_local_commit()[:12]} of this checkout" + (
            " (uncommitted changes stay behind)" if dirty else "")
    else:
        code = "what an earlier launch installed (--no-install)"
    shipped = config_to_ship(args.config)
    return f"tpu_pod: the workers run {code}" + (
        f", with the config file {shipped} copied as {REMOTE_DIR}/{SHIPPED_CONFIG}" if shipped else "")


def start_command(args: argparse.Namespace, overrides: list[str]) -> str:
    """The remote command that starts the run on a worker, detached from the SSH session.

    setsid gives it a session of its own, so a dropped connection (its SIGHUP) does not reach
    it; nohup ignores SIGHUP besides; stdin, stdout and stderr leave the connection. The inner
    shell writes the main process's id (a SIGTERM to it saves and stops the run) and, when it
    ends, its exit status; `setsid -w` exits with that status, which --wait waits for.
    """
    python = f"~/{VENV}/bin/python"
    run = (f"{python} {shlex.join(main_argv(args, overrides))} & echo $! > ~/{PID}; wait $!;"
           f" status=$?; echo $status > ~/{STATUS}; exit $status")
    refuse = ('echo "tpu_pod: error: $(hostname): {why}" >&2; exit 1')
    steps = [
        f"cd {REMOTE_DIR} || exit 1",
        f"test -x {python} || {{ {refuse.format(why=f'no ~/{VENV}: launch once without --no-install')}; }}",
        f'if kill -0 "$(cat ~/{PID} 2>/dev/null)" 2>/dev/null; then'
        f" {refuse.format(why=f'process $(cat ~/{PID}) of an earlier launch still runs: stop it first')}; fi",
        f"rm -f ~/{STATUS}",
        f"setsid -w nohup bash -c {shlex.quote(run)} >> ~/{LOG} 2>&1 < /dev/null & runner=$!",
        ('wait "$runner"' if args.wait else f'echo "$(hostname): started, output in ~/{LOG}"'),
    ]
    return "; ".join(steps)


def train_command(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    return on_all_workers(args, start_command(args, overrides))


def watch_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """How to follow and stop a started run: process 0's output on worker 0, and a SIGTERM
    there, which JAX's preemption notifier passes to every process: all save the same step
    and exit 75."""
    return {"output": _gcloud("ssh", args, args.tpu, worker="0") + [f"--command=tail -n 100 -F ~/{LOG}"],
            "stop": _gcloud("ssh", args, args.tpu, worker="0") + [f'--command=kill -TERM "$(cat ~/{PID})"'],
            "exit statuses": on_all_workers(args, f"cat ~/{STATUS}")}


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    shipped = config_to_ship(args.config)
    commands = ((install_commands(args) if args.install else [])
                + ([ship_config_command(args, shipped)] if shipped else [])
                + [train_command(args, overrides)])
    print(revision(args), file=sys.stderr, flush=True)
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    for command in commands:
        print("+", shlex.join(command), flush=True)
        status = subprocess.run(command).returncode
        if status:
            return status
    if not args.wait:
        print("The run goes on on every worker without this connection. Its metrics: "
              f"tensorboard --logdir={args.workdir}")
        for what, command in watch_commands(args).items():
            print(f"  {what}: {shlex.join(command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
