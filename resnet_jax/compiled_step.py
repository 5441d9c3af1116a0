"""The compiled train step kept on disk, so that a restarted run skips tracing it too.

JAX's persistent compilation cache (`compilation_cache_dir`) spares a restart XLA's compile, but
not the tracing and lowering that compute its key: on the 2-core CPU, 3.5 s of the 7.8 s that a
restarted unrolled ResNet-152 step took to compile from that cache (benchmarks/README.md). Here
the executable itself is kept, under a key computed without tracing, from everything the traced
step depends on: the source of every module the process imported that is not part of Python or
of an installed package (this package, the configs, the user's own code), the installed
packages and their versions, XLA's and JAX's environment variables and settings, the devices,
the run's config, and the arguments' tree, shapes, types and shardings.
An edit the key cannot see (a file of an installed package changed in place, its version not)
would run the old step: remove the directory after one. Loading an executable runs what it
holds: keep the directory where only you can write, as the checkpoints.
"""

import hashlib
import os
import sys
import sysconfig
from typing import Any, Callable

import jax
from absl import logging
from jax.experimental import serialize_executable

PACKAGE = __name__.split(".")[0]


def _installed_directories() -> list[str]:
    return sorted({p for key, p in sysconfig.get_paths().items()
                   if key in ("stdlib", "platstdlib", "purelib", "platlib")})


def _own_sources() -> list[str]:
    """The files of the imported modules that no installed package or Python itself provides."""
    installed = tuple(os.path.join(p, "") for d in _installed_directories()
                      for p in {d, os.path.realpath(d)})
    files = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        # TensorFlow's autograph writes the functions it converts to temporary files, named
        # afresh in each process; they are made from code counted here or installed. Some
        # modules name a file that is not there (generated code): nothing to read.
        if (not isinstance(path, str) or not path.endswith(".py") or not os.path.isabs(path)
                or name.startswith("__autograph_generated_file")):
            continue
        # This package counts whether installed in place (editable) or copied.
        if (name.split(".")[0] == PACKAGE or not path.startswith(installed)) and os.path.isfile(path):
            files.add(path)
    return sorted(files)


def _installed_packages() -> list[str]:
    """The installed packages' metadata directories, whose names carry their versions
    ("jax-0.10.2.dist-info")."""
    return sorted(name for d in _installed_directories() if os.path.isdir(d)
                  for name in os.listdir(d) if name.endswith((".dist-info", ".egg-info")))


def key(args: tuple, config_json: str) -> str:
    """The key of a step compiled for `args` in this process, without tracing it."""
    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        digest.update(repr(parts).encode())

    for path in _own_sources():
        with open(path, "rb") as f:
            add(path, hashlib.sha256(f.read()).hexdigest())
    add(_installed_packages())
    add(sorted((k, v) for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "TPU_", "LIBTPU"))))
    add(sorted((k, repr(v)) for k, v in jax.config.values.items()))
    device = jax.devices()[0]
    add(device.client.platform_version, jax.process_index(), jax.process_count(),
        [(d.id, d.platform, d.device_kind, d.process_index, getattr(d, "coords", None))
         for d in jax.devices()])
    leaves, tree = jax.tree.flatten(args)
    add(str(tree), [(getattr(x, "shape", None), str(getattr(x, "dtype", type(x))),
                     str(getattr(x, "sharding", None))) for x in leaves])
    add(config_json)
    return digest.hexdigest()


def load_or_compile(jitted: Callable, args: tuple, out_tree: Any, directory: str,
                    config_json: str) -> tuple[Callable, bool]:
    """(the compiled step, whether it was loaded). `jitted` compiled for `args`, or the executable
    a run before compiled under the same key. `out_tree`, the tree of the step's outputs, is
    given, not traced: it is checked against the compiled step's when compiling."""
    name = os.path.join(directory, f"{key(args, config_json)}.process{jax.process_index()}")
    in_tree = jax.tree.structure((args, {}))
    try:
        with open(name, "rb") as f:
            payload = f.read()
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree), True
    except FileNotFoundError:
        pass
    except Exception as error:  # a truncated or foreign file: compile afresh and replace it
        logging.warning("The compiled step %s could not be loaded (%s); compiling it", name,
                        _first_line(error))
    compiled = jitted.lower(*args).compile()
    if compiled.out_tree != out_tree:
        raise ValueError(f"the step's outputs are {compiled.out_tree}, not the {out_tree} given")
    try:
        _keep(serialize_executable.serialize(compiled)[0], name)
    except (OSError, ValueError, NotImplementedError) as error:  # a full disk; a backend that
        # cannot serialise its executables
        logging.warning("The compiled step could not be kept in %s (%s); the run goes on",
                        directory, _first_line(error))
    return compiled, False


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _keep(payload: bytes, name: str) -> None:
    """Writes `payload` to `name` and removes this process's steps of other keys (other code,
    configs or shapes), so that the directory holds one step per process. Written aside and
    renamed, so that a run killed while writing leaves no partial step."""
    directory = os.path.dirname(name)
    os.makedirs(directory, exist_ok=True)
    partial = f"{name}.partial"
    with open(partial, "wb") as f:
        f.write(payload)
    os.replace(partial, name)
    suffix = f".process{jax.process_index()}"
    for other in os.listdir(directory):
        path = os.path.join(directory, other)
        if path != name and other.endswith((suffix, suffix + ".partial")):
            os.remove(path)
