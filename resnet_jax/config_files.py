"""Config files by name or by path: `quickstart`, `cifar:depth=110`, `configs/resnet50.py`, or a
user's `my_config.py`, each with an optional `:ARG`.

The shipped configs are the `configs` package: the repository's folder when run from its root,
the installed copy (beside `resnet_jax`) anywhere else. So a name works from any directory, the
repository's own paths (`configs/cifar.py:depth=56`) work from any directory too, and a user's
file builds on the shipped defaults with `from configs import default`. Config files are local
files on the machine that starts the run (unlike workdirs, never a bucket).
"""

import importlib.util
import os

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
                     f"({', '.join(shipped())})")
