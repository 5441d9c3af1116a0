"""The main job: python -m resnet_jax.main --config=configs/resnet50.py --workdir=DIR

Fields of the config are overridable on the command line (--config.train.batch_size=4096), and
parametrised configs take an argument (--config=configs/cifar.py:depth=56,plain=True). Without
--config the quickstart runs. On a pod every process runs this same command (each under a
parent of its own: `supervisor.py`).

Exit statuses: 0 finished; 75 stopped by SIGTERM (preemption) after saving, to be run again;
130 stopped by Ctrl-C after saving; 1 a run that cannot go on (non-finite loss; a failed write of
a checkpoint, metrics.jsonl, TensorBoard events, config.json or log.txt, a full disk; another
process of the run died; this one was killed or crashed), in one line
on stderr, its last, naming what failed and the latest complete checkpoint (or that none was
written), no half-written checkpoint left, the traceback in log.txt; 2 a bad flag, config or
workdir, refused in one line on stderr before anything is written, or a workdir none of whose
checkpoints can be restored (--restart starts it over).
"""

import contextlib
import sys

from resnet_jax.distributed import supervisor
from resnet_jax.training import interrupt

if __name__ == "__main__":  # first: the imports below take seconds
    interrupt.install("resnet_jax")
    if supervisor.needed(sys.argv):  # a process of a multi-process run: under its parent
        supervisor.run(sys.argv)

from resnet_jax import cpu  # noqa: E402

cpu.set_cpu_fusion()  # before JAX starts its backends

from absl import app, flags, logging  # noqa: E402

from resnet_jax.cli import config_files, config_help, flags as cli_flags  # noqa: E402
from resnet_jax.distributed import peers, sharding  # noqa: E402
from resnet_jax.run import console  # noqa: E402

FLAGS = flags.FLAGS
# This command's flags beside --config, in --help's order.
_OURS = ("workdir", "allow_config_change", "restart", "coordinator_address", "num_processes",
         "process_id")


def _spec(argv: list[str]) -> str:
    """--config's value as a path (a shipped config's name resolved), :ARG kept; the quickstart's
    without one."""
    return config_files.resolve(cli_flags.value(argv, "config") or "quickstart")


def define_flags(argv: list[str]) -> list[str]:
    """Defines the flags, --config's from its file (--help: says them all and exits); returns
    argv as absl parses it."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and "
                        "metrics.jsonl.")
    flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose run had another config.")
    flags.DEFINE_bool("restart", False, "Start from step 0 when no checkpoint of the workdir can "
                      "be restored (they are moved to WORKDIR/corrupt_checkpoints).")
    sharding.define_flags()
    try:
        spec = _spec(argv)
        config, arguments = cli_flags.load(spec)
    except Exception as error:
        cli_flags.fail(f"--config: {error}")
    if any(arg in config_help.HELP for arg in argv[1:]):
        sys.stdout.write(_help(argv, spec, config, arguments))
        sys.exit(0)
    return cli_flags.define_config(argv, config, "Experiment config.")


def _help(argv: list[str], spec: str, config, arguments: dict[str, str]) -> str:
    flags_help = "\n".join(
        ["--config: a shipped config's name or a config file, :ARG for its arguments (below); "
         "the quickstart's when omitted."]
        + [f"--{name}: {FLAGS[name].help}" for name in _OURS]
        + ["--verbosity: 1 shows the libraries' log lines (orbax, absl, XLA) on the terminal too; "
           "every line goes to WORKDIR/log.txt."])
    name = spec.partition(":")[0]
    if cli_flags.value(argv, "config") is None:
        name += " (the quickstart: no --config given)"
    return config_help.text(config, name, flags_help, arguments)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors instead of tracebacks."""
    rest = cli_flags.parse(argv)
    if not FLAGS.workdir:
        cli_flags.fail("--workdir is required: the directory for checkpoints, metrics and events")
    return rest


def main(argv):
    del argv
    console.setup()
    launch = sharding.initialize_from_flags()
    # After distributed start-up: these import TensorFlow and touch devices.
    import jax  # pylint: disable=import-outside-toplevel

    supervisor.tell(jax.process_index(), jax.process_count())
    from resnet_jax.run import checkpoint, paths
    from resnet_jax.training import finished

    with contextlib.suppress(paths.WorkdirError):  # else setup says what is wrong with it
        peers.watch(paths.resolve(FLAGS.workdir))

    sys.unraisablehook = checkpoint.quiet_closed_loop(sys.unraisablehook)
    if launch != sharding.ONE_PROCESS:
        launch = f"process {jax.process_index()} of {jax.process_count()} (launched by {launch})"
    logging.info("Started as %s: %d of the %d devices", launch, jax.local_device_count(),
                 jax.device_count())
    config = FLAGS.config
    logging.info("Config %s; differs from configs/default.py in %s (all of it: WORKDIR/config.json)",
                 _spec(sys.argv), _differences(config) or "nothing")
    if finished.final_step(config, FLAGS.workdir) is not None:
        try:
            logging.info("This run has finished; nothing to do. %s", _result(FLAGS.workdir))
        except ValueError as error:  # a bad line of metrics.jsonl, named
            cli_flags.fail(error)
        finally:
            console.close()
        return
    from resnet_jax.run import validate
    from resnet_jax.training import loop, preemption, writers

    ending = None  # (the last line, the exit status) of a run that did not finish
    try:
        # A multi-process JAX operation issued off the main thread is an error, not a hang.
        with jax.thread_guard(True):
            loop.train_and_evaluate(config, FLAGS.workdir, FLAGS.allow_config_change,
                                    restart=FLAGS.restart)
        logging.info("%s", _result(FLAGS.workdir))
    except (validate.SetupError, checkpoint.UnrestorableError) as error:
        ending = f"error: {error}", 2
    except preemption.Preempted as stop:
        ending = str(stop), stop.status
    except KeyboardInterrupt:  # before the loop's own handler, which saves, or after it
        ending = f"stopped by Ctrl-C; {peers.latest_checkpoint()}", interrupt.STATUS
    except jax.errors.JaxRuntimeError as error:
        logging.info("The run stopped on this error:", exc_info=True, extra=console.LOG_FILE_ONLY)
        if jax.process_count() > 1:  # a collective with a process that died: not waiting for it
            console.close()
            peers.end(f"resnet_jax: error: {peers.collective_failed(error)}; "
                      f"{peers.latest_checkpoint()}", 1)
        else:
            ending = (f"error: the devices failed: {validate.one_line(error)}; "
                      f"{_left(FLAGS.workdir)}", 1)
    except (loop.TrainingError, checkpoint.CheckpointError, OSError) as error:
        # The traceback (a library's, a full disk's) for the log file; the terminal gets one line.
        logging.info("The run stopped on this error:", exc_info=True, extra=console.LOG_FILE_ONLY)
        if isinstance(error, OSError):  # a write outside the loop's steps (config.json, ...)
            named = isinstance(error, writers.WriterError)  # says what it wrote
            error = (f"{'' if named else type(error).__name__ + ': '}{validate.one_line(error)}; "
                     f"{_left(FLAGS.workdir)}")
        ending = f"error: {error}", 1
    finally:
        log_failure = console.close()  # first: no library's late record follows the last line
    if ending is None and log_failure:  # finished, but log.txt failed since the loop last looked
        ending = f"error: {log_failure}; {_left(FLAGS.workdir)}", 1
    if ending is not None:
        print(f"resnet_jax: {ending[0]}", file=sys.stderr)
        sys.exit(ending[1])


def _left(workdir: str) -> str:
    """What an error says is left (`checkpoint.last_complete`), read from the workdir: the run's
    own checkpoint manager is gone. Also removes what failed saves left."""
    from resnet_jax.run import checkpoint, paths
    try:
        return checkpoint.last_complete(checkpoint.reader(paths.resolve(workdir)))
    except Exception as error:  # a disk that fails even this: the error being reported comes first
        return f"the checkpoints could not be read ({' '.join(str(error).split())})"


def _differences(config) -> str:
    """The fields of `config` whose values differ from configs/default.py's, as FIELD=VALUE."""
    from configs import default  # pylint: disable=import-outside-toplevel
    from resnet_jax.run import validate  # pylint: disable=import-outside-toplevel

    defaults = validate.dotted(default.get_config().to_dict())
    return ", ".join(f"{key}={value}" for key, value in validate.dotted(config.to_dict()).items()
                     if key not in defaults or defaults[key] != value)


def _result(workdir: str) -> str:
    """The last line: the final metrics and where the run's files are."""
    from resnet_jax.run import jsonl, paths
    path = paths.resolve(workdir)
    rows = jsonl.read_rows(path) if (path / jsonl.JSONL).exists() else []
    last_eval = next((row for row in reversed(rows) if "eval_accuracy" in row), {})
    shown = {k: v for k, v in last_eval.items() if k.startswith(("eval_", "train_", "ema_eval_"))}
    figures = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
    return (f"Finished step {last_eval.get('step', rows[-1]['step'] if rows else 0)}: "
            f"{figures or 'no eval'}; metrics in {path / jsonl.JSONL}, checkpoints in "
            f"{path / 'checkpoints'}, the whole log in {path / 'log.txt'}")


if __name__ == "__main__":
    app.run(main, argv=define_flags(sys.argv), flags_parser=parse_flags)
