"""How long the main job takes to say that a run has finished: the same command, run again.

    python -m benchmarks.finished_run [--tries 10] [--steps 20] [--workdir DIR] [--json]

Trains the quickstart for `--steps` steps in DIR (a new temporary directory by default), then runs the
same command `--tries` times on the finished workdir and prints the median and the range of the
wall-clock seconds of each whole process (Python's start and JAX's import included).
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import cli


def _run(workdir: str, steps: int) -> float:
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "resnet_jax.main", "--config=quickstart",
                             f"--config.train.num_steps={steps}", f"--config.eval.every_steps={steps}",
                             f"--workdir={workdir}"],
                            capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"error: the main job failed: {result.stderr[-2000:]}")
    return seconds


def main(argv: list[str]) -> None:
    parser = cli.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.tries < 1 or args.steps < 1:
        parser.error("--tries and --steps must be at least 1")
    workdir = args.workdir or tempfile.mkdtemp(prefix="finished_run_")
    training = _run(workdir, args.steps)
    times = [_run(workdir, args.steps) for _ in range(args.tries)]
    result = {"tries": args.tries, "seconds_median": statistics.median(times),
              "seconds_min": min(times), "seconds_max": max(times), "training_seconds": training}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"a finished run: {result['seconds_median']:.2f} s (median of {args.tries}; "
              f"{result['seconds_min']:.2f}-{result['seconds_max']:.2f} s); training it took "
              f"{training:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
