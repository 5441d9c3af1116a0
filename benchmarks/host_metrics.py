"""What the per-host speed of each log line costs: `metrics.Window.scalars` on several processes.

    python -m benchmarks.host_metrics [--processes 2] [--calls 200] [--json]

Starts the processes on localhost (one CPU device each), joined by jax.distributed as the main
job's are, and times `Window.scalars`, which gathers every host's step and data-wait seconds
(one small all-gather) at each log line. Prints the median and the largest seconds per call,
as process 0 saw them.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from benchmarks import cli


def _worker(address: str, processes: int, index: int, calls: int) -> None:
    import jax  # pylint: disable=import-outside-toplevel

    jax.distributed.initialize(address, processes, index)
    from resnet_jax.training import metrics

    window = metrics.Window(0, batch_size=256, flops_per_step=1.0)
    times = []
    for step in range(1, calls + 1):
        began = time.perf_counter()
        window.scalars(step)
        times.append(time.perf_counter() - began)
    if index == 0:
        print(json.dumps({"processes": processes, "calls": calls,
                          "seconds_median": statistics.median(times[1:]),
                          "seconds_max": max(times[1:]), "seconds_first": times[0]}))


def main(argv: list[str]) -> None:
    parser = cli.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, type=str, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        address, index = args.worker
        _worker(address, args.processes, int(index), args.calls)
        return
    if args.processes < 2 or args.calls < 2:
        parser.error("--processes and --calls must be at least 2")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workers = [subprocess.Popen([sys.executable, "-m", "benchmarks.host_metrics", "--processes",
                                 str(args.processes), "--calls", str(args.calls), "--worker",
                                 address, str(i)], env=env, stdout=subprocess.PIPE, text=True)
               for i in range(args.processes)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    if any(w.returncode for w in workers):
        raise SystemExit("error: a worker failed")
    result = json.loads(outputs[0].strip().splitlines()[-1])
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.processes} processes: {result['seconds_median'] * 1e3:.2f} ms a log line "
              f"(median of {args.calls - 1}; largest {result['seconds_max'] * 1e3:.2f} ms)")


if __name__ == "__main__":
    main(sys.argv[1:])
