"""How a run stops when asked: SIGTERM (a preemption) or Ctrl-C saves the current step and
stops; the same command resumes it."""

import os
import signal
import sys

import jax

from resnet_jax.run import checkpoint
from resnet_jax.training import interrupt


class Preempted(Exception):
    """The run was asked to stop (SIGTERM: preemption; SIGINT: Ctrl-C), saved its step and
    stopped; the same command resumes it. `status` is the exit status that says so."""

    def __init__(self, step: int, status: int):
        super().__init__(f"stopped at step {step} and saved it; the same command resumes")
        self.step, self.status = step, status


PREEMPTED_STATUS = 75  # EX_TEMPFAIL, "try again": `launch/slurm.sbatch` requeues on it


INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report Ctrl-C


class Preemption:
    """SIGTERM or a first Ctrl-C asks the run to save and stop at the next step; a second Ctrl-C
    exits at once.

    One process: the signal sets a flag that the loop reads between steps. Several processes:
    JAX's preemption notifier (installed by jax.distributed) catches SIGTERM and tells the other
    processes; `checkpoint.reached_preemption` then stops every process at the same step. No
    SIGTERM handler of ours may replace JAX's, so there a Ctrl-C is passed on to it as a SIGTERM.
    """

    def __init__(self):
        self.status = None
        self._several = jax.process_count() > 1
        interrupt.check()  # a Ctrl-C since the lock was taken: stop now, saving nothing
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt)}
        if not self._several:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame):
        self.status = self.status or PREEMPTED_STATUS

    def _interrupt(self, signum, frame):
        if self.status == INTERRUPTED_STATUS:
            print("resnet_jax: interrupted again: exiting without saving", file=sys.stderr)
            os._exit(INTERRUPTED_STATUS)  # at once: no wait for the save in flight
        self.status = INTERRUPTED_STATUS
        print("resnet_jax: interrupted: saving the current step, then exiting (Ctrl-C again "
              "exits at once)", file=sys.stderr)
        if self._several:
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, manager, step: int) -> bool:
        if self._several:
            return checkpoint.reached_preemption(manager, step)
        return self.status is not None

    def exit_status(self) -> int:
        # Several processes: a SIGTERM to any one of them stops them all.
        return self.status or PREEMPTED_STATUS

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
