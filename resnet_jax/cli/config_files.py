"""Config files by name or by path: `quickstart`, `cifar:depth=110`, `configs/resnet50.py`, or a
user's `my_config.py`, each with an optional `:ARG`.

The shipped configs are the `configs` package: the repository's folder when run from its root,
the installed copy (beside `resnet_jax`) anywhere else. So a name works from any directory, the
repository's own paths (`configs/cifar.py:depth=56`) work from any directory too, and a user's
file builds on the shipped defaults with `from configs import default`. Config files are local
files on the machine that starts the run (unlike workdirs, never a bucket).
"""

import importlib.util
import json
import os
import re

import ml_collections

from resnet_jax.run import paths

NOT_CONFIGS = ("__init__", "arguments")  # modules of the package that are not configs


def directory() -> str:
    """The folder of the `configs` package that `import configs` would load."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the configs package is not installed beside resnet_jax "
                         "(pip install the repository, or run from its root)")
    return list(spec.submodule_search_locations)[0]


def shipped() -> list[str]:
    """The names of the shipped configs and sweeps."""
    return sorted(name[:-3] for name in os.listdir(directory())
                  if name.endswith(".py") and name[:-3] not in NOT_CONFIGS)


def is_sweep(name: str) -> bool:
    """Whether the shipped config `name` is a sweep (it defines get_sweep, for launch.sweep)."""
    with open(os.path.join(directory(), f"{name}.py")) as f:
        return "\ndef get_sweep(" in f.read()


def resolve(spec: str) -> str:
    """`spec` ("NAME[:ARG]" or "PATH[:ARG]") with its file as a path that exists: the path itself
    where that file exists, else the shipped config of that name; ValueError otherwise."""
    path, colon, arg = spec.partition(":")
    if os.path.isfile(path):
        return spec
    name = path.removeprefix("configs/").removesuffix(".py")
    if name in shipped():
        return os.path.join(directory(), f"{name}.py") + colon + arg
    raise ValueError(f"{spec!r} is neither a file nor the name of a shipped config "
                     f"({', '.join(shipped())}){_suggestion(name)}")


def _suggestion(name: str) -> str:
    """'; for the CIFAR network, --config=cifar:depth=20' where `name` reads as a CIFAR
    network's (resnet20, plain56, cifar_resnet110: 6n+2 layers, Sec. 4.2)."""
    match = re.fullmatch(r"(?:cifar_?)?(resnet|plain)(\d+)", name)
    if not match or (int(match.group(2)) - 2) % 6 or int(match.group(2)) < 8:
        return ""
    plain = ",plain=True" if match.group(1) == "plain" else ""
    return f"; for the CIFAR network of Sec. 4.2, --config=cifar:depth={match.group(2)}{plain}"


def of_run(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (WORKDIR/config.json), on configs/default.py's fields, so
    that each keeps its type (tuples, placeholders) and takes --config.FIELD overrides."""
    from configs import default  # pylint: disable=import-outside-toplevel  (its package)

    def merge(config, values):
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
                merge(config[key], value)
            else:  # JSON has lists where the configs have tuples
                config[key] = tuple(value) if isinstance(value, list) else value

    config = default.get_config()
    merge(config, json.loads((paths.resolve(str(workdir)) / "config.json").read_text()))
    return config


def unknown_field(config: ml_collections.ConfigDict, argv: list[str]) -> str | None:
    """The one line for the first --config.FIELD override that names no field of `config`."""
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node:
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                return f"config field {'.'.join(path[:depth + 1])!r} does not exist (fields there: {known})"
            node = node[key]
    return None
