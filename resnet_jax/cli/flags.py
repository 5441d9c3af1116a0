"""The command line of every command: for the main job and evaluate, `--config` by name or path
with its `--config.FIELD=VALUE` overrides and the command's own flags (absl); for report, its
subcommands (`ArgumentParser`, as absl has none). Anything that cannot be read is one line on
stderr and exit status 2. Nothing here runs at import: a command defines its flags when it is
run (`python -m`), so that importing it does nothing."""

import argparse
import runpy
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

from resnet_jax.cli import config_files

BAD_INPUT = 2


def say_error(message: str) -> None:
    """The one line on stderr of a command that stops on what the user can fix."""
    print(f"resnet_jax: error: {' '.join(str(message).split())}", file=sys.stderr)


def fail(message: str, status: int = BAD_INPUT) -> None:
    """One line on stderr, then exit: no traceback for what the user can fix."""
    say_error(message)
    sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for a command with subcommands, failing as the other commands fail: one line
    (not argparse's usage and error), exit status 2. Its subcommands' parsers are of this class."""

    def error(self, message: str) -> None:
        fail(f"{self.prog}: {message} (--help lists the arguments)")


def value(argv: list[str], name: str) -> str | None:
    """--NAME's value (`--NAME=X` or `--NAME X`), read before the flags are defined; or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg[len(f"--{name}="):]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load(spec: str) -> tuple[Any, dict[str, str]]:
    """(the config that `spec`, NAME|PATH[:ARG], names, the arguments its file takes: its
    ARGUMENTS, or none); a ValueError names what is wrong."""
    path, _, arg = config_files.resolve(spec).partition(":")
    namespace = runpy.run_path(path)
    get_config = namespace["get_config"]
    return (get_config(arg) if arg else get_config()), namespace.get("ARGUMENTS", {})


def without_config(argv: list[str]) -> list[str]:
    """`argv` less its --config=X (or --config X): the config is loaded by `load`, and the flag
    `define_config` defines takes the --config.FIELD overrides alone."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--config" and i + 1 < len(argv):
            skip = True
        elif not arg.startswith("--config="):
            kept.append(arg)
    return kept


def define_config(argv: list[str], config, about: str,
                  flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Defines the flag `config` holding `config`, which takes argv's --config.FIELD=VALUE
    overrides when the flags are parsed; returns argv without --config itself."""
    argv = without_config(argv)
    try:  # the overrides in argv are defined as flags here (sys_argv), then parsed by `parse`
        config_flags.DEFINE_config_dict("config", config, about, lock_config=True,
                                        flag_values=flag_values, sys_argv=argv)
    except Exception as error:
        fail(config_files.unknown_field(config, argv) or error)
    return argv


def parse(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's parse of `argv`, a bad flag or override in one line; no positional arguments."""
    try:
        rest = flag_values(argv)
    except Exception as error:
        fail(config_files.unknown_field(flag_values["config"].value, argv) or error)
    if len(rest) > 1:
        fail(f"unexpected arguments: {' '.join(rest[1:])}")
    return rest
