"""Runs the main job on every worker of a Cloud TPU pod slice, from your own machine:

    python -m launch.tpu_pod --tpu=NAME --zone=ZONE [--project=PROJECT] \
        --workdir=gs://BUCKET/runs/resnet50 --config=configs/resnet50.py [--config.x=y ...] [--dry-run]

First it installs the project on all workers: the committed tree of this checkout (`git archive
HEAD`), or with --repo=URL a clone of that repository at --ref (default: this checkout's commit),
then `pip install -r requirements.txt -e .` and `jax[tpu]` at the version requirements.txt pins.
Then every worker runs the same main command from the copy's root; JAX joins the workers into one
program. --no-install skips the first part. --dry-run prints each command and runs none.

The gcloud ssh stays open while the job runs. If it drops, run the same command again: the job
resumes from its last checkpoint in the workdir.
"""

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The copy's directory on each worker, relative to the login's home directory.
REMOTE_DIR = "resnet_jax"


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
                        help="the workers already have the project installed")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if any("=" not in o for o in overrides):
        _fail(f"config overrides take the form --config.FIELD=VALUE; got {next(o for o in overrides if '=' not in o)}")
    # Each worker has its own disk: checkpoints and metrics must go where all of them write and read.
    if not args.workdir.startswith("gs://"):
        _fail(f"--workdir must be a gs:// path that all workers share; got {args.workdir!r}")
    return args, overrides


def _gcloud(verb: str, args: argparse.Namespace, *operands: str) -> list[str]:
    project = [f"--project={args.project}"] if args.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *operands, f"--zone={args.zone}", *project,
            "--worker=all"]


def on_all_workers(args: argparse.Namespace, remote_command: str) -> list[str]:
    return _gcloud("ssh", args, args.tpu) + [f"--command={remote_command}"]


def _jax_tpu_requirement() -> str:
    """jax[tpu] at the version requirements.txt pins, so libtpu matches the tested jax."""
    pinned = re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    return f"jax[tpu]=={pinned.group(1)}" if pinned else "jax[tpu]"


def _local_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def install_commands(args: argparse.Namespace) -> list[list[str]]:
    """Put the project on every worker and install it with its pinned requirements."""
    pip = (f"python3 -m pip install -r requirements.txt -e . {shlex.quote(_jax_tpu_requirement())}")
    cd = f"cd {REMOTE_DIR}"
    if args.repo:
        ref = shlex.quote(args.ref or _local_commit())
        fetch = (f"(test -d {REMOTE_DIR}/.git || git clone {shlex.quote(args.repo)} {REMOTE_DIR}) && {cd} "
                 # FETCH_HEAD, not the ref by name: a branch already checked out on a worker
                 # from an earlier launch would otherwise stay at its old commit.
                 f"&& git fetch --quiet origin {ref} && git checkout --quiet --force --detach FETCH_HEAD")
        return [on_all_workers(args, f"{fetch} && {pip}")]
    # Only committed files travel: the pod runs a known commit, not half-edited local files.
    archive = str(Path(tempfile.gettempdir()) / "resnet_jax_launch.tar.gz")
    unpack = f"mkdir -p {REMOTE_DIR} && tar -xzf resnet_jax_launch.tar.gz -C {REMOTE_DIR} && {cd}"
    return [["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
            _gcloud("scp", args, archive, f"{args.tpu}:resnet_jax_launch.tar.gz"),
            on_all_workers(args, f"{unpack} && {pip}")]


def train_command(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The same main command on every worker, run from the copy's root (configs import configs/)."""
    main = ["python3", "-m", "resnet_jax.main", f"--config={args.config}", f"--workdir={args.workdir}",
            *overrides]
    return on_all_workers(args, f"cd {REMOTE_DIR} && {shlex.join(main)}")


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    commands = (install_commands(args) if args.install else []) + [train_command(args, overrides)]
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    if args.install and not args.repo:
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout
        if dirty:
            print("tpu_pod: warning: uncommitted changes stay behind; the workers get HEAD", file=sys.stderr)
    for command in commands:
        print("+", shlex.join(command), flush=True)
        status = subprocess.run(command).returncode
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
