"""Evaluate a run's checkpoint, or a file of weights, on an eval split with any test protocol:

    python -m resnet_jax.evaluate --workdir=DIR [--checkpoint=latest|best|STEP] [--json=FILE]
        [--config.data.eval_split=... --config.data.eval_preprocess=ten_crop|multi_scale ...]
    python -m resnet_jax.evaluate --config=resnet50 --weights=resnet50.pth [--config.data...]

Prints one line with the metrics, named as in metrics.jsonl (eval_accuracy, eval_loss,
eval_top5_accuracy), and writes them with the step as JSON to --json where asked (whole, or not
at all). The config is the run's own (WORKDIR/config.json; or --config=NAME|PATH[:ARG]), with the
command line's overrides: on the run's settings the numbers are those of the run's eval of that
step. It writes nothing else: the workdir is only read. On a pod every process runs the same
command.

A run still training deletes its older checkpoints as it saves new ones (it keeps the last
checkpoint.keep): a step deleted while it is being read is read again as the step --checkpoint
names now (latest, best), a few times; a step named by number is gone.

Exit statuses: 0 evaluated; 2 bad input, refused in one line, or a checkpoint that cannot be
evaluated: corrupt or unreadable (while still there), or the step named by number deleted by the
run while being read; 75 the run saves checkpoints faster than they can be read (each one read
was deleted before the read ended): run it again, or give the run a larger checkpoint.keep;
130 stopped by Ctrl-C. Each of these ends in one line on stderr, without a traceback.
"""

import sys

from resnet_jax.training import interrupt

# First: the imports below take seconds.
if __name__ == "__main__":
    interrupt.install("resnet_jax")

import json  # noqa: E402

from resnet_jax import cpu  # noqa: E402

cpu.set_cpu_fusion()  # before JAX starts its backends

from absl import app, flags  # noqa: E402

from resnet_jax.cli import config_files, config_help, flags as cli_flags  # noqa: E402
from resnet_jax.distributed import sharding  # noqa: E402
from resnet_jax.run import console, paths  # noqa: E402

SAVING_TOO_FAST_STATUS = 75  # EX_TEMPFAIL, "try again", as the main job's preemption
# This command's flags beside --config: (name, help); --checkpoint's default is "latest".
_FLAGS = (("workdir", "The run whose checkpoint is evaluated."),
          ("checkpoint", "Which of its checkpoints: latest, best or a step number."),
          ("weights", "A torchvision .pth or .safetensors file of weights to evaluate instead of a "
                      "checkpoint (with --config)."),
          ("json", "Also write the metrics to this file, as JSON."))
_AVERAGE = ("The checkpoint's moving average of the weights (a run with train.ema_decay > 0) "
            "instead of its weights.")


def _base_config(argv: list[str]):
    """--config's config, or the workdir's; --config.FIELD overrides apply on top of it."""
    spec, workdir = cli_flags.value(argv, "config"), cli_flags.value(argv, "workdir")
    if spec:
        return cli_flags.load(spec)[0]
    if not workdir:
        raise ValueError("--workdir (a run to evaluate) is required, or --config with --weights")
    saved = paths.resolve(workdir) / "config.json"
    if not saved.exists():
        raise ValueError(f"--workdir: {saved} does not exist: no run was started in {workdir}")
    return config_files.of_run(workdir)


def define_flags(argv: list[str]) -> list[str]:
    """Defines the flags, --config's from its file or the run's (--help: says them and exits);
    returns argv as absl parses it."""
    if any(arg in config_help.HELP for arg in argv[1:]):
        flags_help = "\n".join(f"--{name}: {about}" for name, about in (*_FLAGS, ("average", _AVERAGE)))
        sys.stdout.write(f"{__doc__.strip()}\n\n{flags_help}\n--config=NAME|PATH[:ARG], "
                         f"--config.SECTION.FIELD=VALUE: as the main job's (python -m "
                         f"resnet_jax.main --config=NAME --help lists a config's fields)\n")
        sys.exit(0)
    try:
        config = _base_config(argv)
    except Exception as error:
        cli_flags.fail(error)
    for name, about in _FLAGS:
        flags.DEFINE_string(name, "latest" if name == "checkpoint" else None, about)
    flags.DEFINE_bool("average", False, _AVERAGE)
    sharding.define_flags()
    return cli_flags.define_config(argv, config, "The config to evaluate with.")


def parse_flags(argv: list[str]) -> list[str]:
    rest = cli_flags.parse(argv)
    f = flags.FLAGS
    if f.weights and f["checkpoint"].present:
        cli_flags.fail("--weights and --checkpoint name two things to evaluate: give one")
    if f.weights and f.average:
        cli_flags.fail("--average is a checkpoint's moving average of the weights: not with --weights")
    if not f.weights and not f.workdir:
        cli_flags.fail("--workdir (a run to evaluate) is required, or --weights with --config")
    return rest


def main(argv: list[str]) -> None:
    del argv
    console.setup()
    sharding.initialize_from_flags()
    import jax  # pylint: disable=import-outside-toplevel

    from resnet_jax.run import checkpoint, live
    from resnet_jax.training import evaluation

    # A failed read's tensorstore reads end in orbax's closed event loop: no tracebacks of theirs.
    sys.unraisablehook = checkpoint.quiet_closed_loop(sys.unraisablehook)
    f = flags.FLAGS
    try:
        with jax.thread_guard(True):
            step, scores = evaluation.evaluate_saved(f.config, f.workdir, f.checkpoint, f.weights,
                                                     average=f.average)
    except ValueError as error:  # CorruptCheckpoint and StepDeleted among them
        cli_flags.fail(error)
    except live.SavingTooFast as error:
        cli_flags.fail(error, SAVING_TOO_FAST_STATUS)
    finally:
        console.close()
    interrupt.done()  # evaluated: what is left is the output, written whole
    which = "" if f.checkpoint.isdigit() else f" ({f.checkpoint})"
    what = f.weights or (f"{'the moving average of ' if f.average else ''}step {step}{which} of "
                         f"{f.workdir}")
    line = " ".join(f"{k}={v:.6g}" for k, v in scores.items())
    if jax.process_index() == 0:
        print(f"{line}  [{what}; {f.config.data.name} {f.config.data.eval_split} split, "
              f"eval_preprocess={f.config.data.eval_preprocess}]")
        if f.json:
            paths.write_text(paths.resolve(f.json), json.dumps({"step": step, **scores}) + "\n")


if __name__ == "__main__":
    app.run(main, argv=define_flags(sys.argv), flags_parser=parse_flags)
