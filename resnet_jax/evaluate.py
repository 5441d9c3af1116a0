"""Evaluate a run's checkpoint, or a file of weights, on an eval split with any test protocol:

    python -m resnet_jax.evaluate --workdir=DIR [--checkpoint=latest|best|STEP] [--json=FILE]
        [--config.data.eval_split=... --config.data.eval_preprocess=ten_crop|multi_scale ...]
    python -m resnet_jax.evaluate --config=resnet50 --weights=resnet50.pth [--config.data...]

Prints one line with the metrics, named as in metrics.jsonl (eval_accuracy, eval_loss,
eval_top5_accuracy), and writes them with the step as JSON to --json where asked. The config is
the run's own (WORKDIR/config.json; or --config=NAME|PATH[:ARG]), with the command line's
overrides: on the run's settings the numbers are those of the run's eval of that step. It writes
nothing else: the workdir is only read. On a pod every process runs the same command.
"""

import json
import sys
from typing import Any, NamedTuple

from resnet_jax import cpu

cpu.set_cpu_fusion()  # before JAX starts its backends

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax import config_files, console, sharding  # noqa: E402

CHECKPOINTS = "latest, best or a step number"


class Weights(NamedTuple):
    """What an eval step takes of a TrainState."""
    params: Any
    batch_stats: Any


def _fail(message: str) -> None:
    print(f"resnet_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _value(argv: list[str], name: str) -> str | None:
    """--NAME=VALUE of the command line, read before the flags are defined."""
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)


def _base_config(argv: list[str]):
    """--config's config, or the workdir's; --config.FIELD overrides apply on top of it."""
    import runpy  # pylint: disable=import-outside-toplevel

    from resnet_jax import workdir as workdirs  # pylint: disable=import-outside-toplevel

    spec, workdir = _value(argv, "config"), _value(argv, "workdir")
    if spec:
        path, _, arg = config_files.resolve(spec).partition(":")
        get_config = runpy.run_path(path)["get_config"]
        return get_config(arg) if arg else get_config()
    if not workdir:
        raise ValueError("--workdir (a run to evaluate) is required, or --config with --weights")
    saved = workdirs.resolve(workdir) / "config.json"
    if not saved.exists():
        raise ValueError(f"--workdir: {saved} does not exist: no run was started in {workdir}")
    return config_files.of_run(workdir)


def checkpoint_step(manager, which: str) -> int:
    """The step that --checkpoint names among the manager's."""
    steps = manager.all_steps()
    if not steps:
        raise ValueError(f"--checkpoint: there is no checkpoint in {manager.directory}")
    if which == "latest":
        return manager.latest_step()
    if which == "best":
        step = manager.best_step()
        if step is None:
            raise ValueError(f"--checkpoint=best: no checkpoint in {manager.directory} has eval metrics")
        return step
    if not which.isdigit() or int(which) not in steps:
        raise ValueError(f"--checkpoint must be {CHECKPOINTS} (steps in {manager.directory}: "
                         f"{', '.join(map(str, sorted(steps)))}); got {which!r}")
    return int(which)


def evaluate(config: Any, workdir: str | None, which: str = "latest",
             weights: str | None = None) -> tuple[int | None, dict[str, float]]:
    """(step, eval metrics) of checkpoint `which` of the run in `workdir`, or of the torchvision
    or safetensors file `weights` (step None), evaluated as the run evaluates. Raises ValueError
    (one line) for bad input and `checkpoint.CorruptCheckpoint` for a checkpoint that is not what
    was saved."""
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from resnet_jax import (analysis, checkpoint, convert, data, device_data, train, validate,
                            workdir as workdirs)  # pylint: disable=import-outside-toplevel

    validate.check_numbers(config)
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    train.eval_batch_size(config, log=True)
    info = (device_data if train.on_device(config) else data).info(config.data)
    model = train.create_model(config, info.num_classes)
    step = None
    if weights:
        try:
            convert.from_torchvision(model, convert.read_weights(weights))
        except (ValueError, OSError) as error:
            raise ValueError(f"--weights: {validate.one_line(error)}") from error
    else:
        manager = checkpoint.reader(workdirs.resolve(workdir))
        step = checkpoint_step(manager, which)
        model = analysis.with_weights(model, checkpoint.pure(checkpoint.read(manager, step, replicated)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    train.load_pixel_mean(config, workdirs.resolve(workdir) if workdir else None)
    eval_fn = train.eval_function(nnx.graphdef(model), config, mesh)
    return step, train.evaluate(eval_fn, jax.device_put(Weights(params, rest), replicated), config, mesh)


def _define_flags(argv: list[str]) -> None:
    try:
        config = _base_config(argv)
    except Exception as error:
        _fail(" ".join(str(error).split()))
    # --config=NAME chose the config above; the flag below takes its --config.FIELD overrides.
    argv[:] = [a for a in argv if not a.startswith("--config=")]
    try:
        config_flags.DEFINE_config_dict("config", config, "The config to evaluate with.",
                                        lock_config=True)
    except Exception as error:
        _fail(config_files.unknown_field(config, argv) or " ".join(str(error).split()))
    flags.DEFINE_string("workdir", None, "The run whose checkpoint is evaluated.")
    flags.DEFINE_string("checkpoint", "latest", f"Which of its checkpoints: {CHECKPOINTS}.")
    flags.DEFINE_string("weights", None, "A torchvision .pth or .safetensors file of weights to "
                        "evaluate instead of a checkpoint (with --config).")
    flags.DEFINE_string("json", None, "Also write the metrics to this file, as JSON.")
    sharding.define_flags()


def _parse(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
    except Exception as error:
        _fail(config_files.unknown_field(flags.FLAGS["config"].value, argv)
              or " ".join(str(error).split()))
    if len(rest) > 1:
        _fail(f"unexpected arguments: {' '.join(rest[1:])}")
    f = flags.FLAGS
    if f.weights and f["checkpoint"].present:
        _fail("--weights and --checkpoint name two things to evaluate: give one")
    if not f.weights and not f.workdir:
        _fail("--workdir (a run to evaluate) is required, or --weights with --config")
    return rest


def main(argv: list[str]) -> None:
    del argv
    console.setup()
    sharding.initialize_from_flags()
    import jax  # pylint: disable=import-outside-toplevel

    from resnet_jax import workdir as workdirs  # pylint: disable=import-outside-toplevel

    f = flags.FLAGS
    try:
        with jax.thread_guard(True):
            step, scores = evaluate(f.config, f.workdir, f.checkpoint, f.weights)
    except ValueError as error:  # CorruptCheckpoint among them
        _fail(" ".join(str(error).split()))
    finally:
        console.close()
    which = "" if f.checkpoint.isdigit() else f" ({f.checkpoint})"
    what = f.weights or f"step {step}{which} of {f.workdir}"
    line = " ".join(f"{k}={v:.6g}" for k, v in scores.items())
    if jax.process_index() == 0:
        print(f"{line}  [{what}; {f.config.data.name} {f.config.data.eval_split} split, "
              f"eval_preprocess={f.config.data.eval_preprocess}]")
        if f.json:
            workdirs.write_text(workdirs.resolve(f.json), json.dumps({"step": step, **scores}) + "\n")


if __name__ == "__main__":
    _define_flags(sys.argv)
    app.run(main, flags_parser=_parse)
