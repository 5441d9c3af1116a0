"""The compiled train step kept on disk, so that a restarted run skips tracing it too.

JAX's persistent compilation cache (`compilation_cache_dir`) spares a restart XLA's compile, but
not the tracing and lowering that compute its key: on the 2-core CPU, 3.0-3.5 s of the 6.7-7.8 s a
restarted unrolled ResNet-152 step took to compile from that cache (benchmarks/README.md). Here
the executable itself is kept, under a key computed without tracing, from everything the traced
step depends on: the source of every module the process imported that is not part of Python or
of an installed package (this package, the configs, the user's own code), the installed
packages (their versions and their lists of files with hashes), XLA's flags, JAX's and Flax's
settings, the devices, what the step closes over (the run's config, its length), and the
arguments' tree, shapes, types and placements. An edit the key cannot see (a file of an
installed package changed in place, not reinstalled) would run the old step: remove the
directory after one. Loading an executable runs what it holds: keep the directory where only
you can write, as the checkpoints.
"""

import contextlib
import hashlib
import os
import sys
import sysconfig
import tempfile
from typing import Any, Callable

import flax
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils, serialize_executable

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


def _installed_packages() -> list[tuple[str, str]]:
    """(metadata directory, whose name carries the version: "jax-0.10.2.dist-info"; hash of its
    RECORD, the installed files and their hashes, which a reinstall at another commit changes)."""
    packages = []
    for directory in _installed_directories():
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name.endswith((".dist-info", ".egg-info")):
                record = os.path.join(directory, name, "RECORD")
                packages.append((name, _file_hash(record) if os.path.isfile(record) else ""))
    return sorted(packages)


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _placement(x: Any) -> tuple:
    sharding = getattr(x, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    return repr(sharding), None if mesh is None else np.asarray(mesh.device_ids).tolist()


def key(args: tuple, closure: str) -> str:
    """The key of a step compiled for `args` in this process, without tracing it. `closure`:
    what the step closes over that the code and the arguments do not show (the run's config)."""
    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        digest.update(repr(parts).encode())

    add([(path, _file_hash(path)) for path in _own_sources()])
    add(_installed_packages())
    # Not TPU_* or the coordinator's address: a recreated VM changes those, not the program.
    add(sorted((k, v) for k, v in os.environ.items()
               if k.startswith(("XLA_", "LIBTPU_INIT_ARGS", "FLAX_", "NNX_"))))
    add(sorted((k, repr(v)) for k, v in jax.config.values.items()),
        sorted((k, repr(v)) for k, v in flax.config._values.items()))
    add(jax.devices()[0].client.platform_version, jax.process_index(), jax.process_count(),
        [(d.id, d.platform, d.device_kind, d.process_index, getattr(d, "coords", None))
         for d in jax.devices()])
    leaves, tree = jax.tree.flatten(args)
    add(str(tree), [(getattr(x, "shape", None), str(getattr(x, "dtype", type(x))),
                     getattr(x, "weak_type", None), _placement(x)) for x in leaves])
    add(closure)
    return digest.hexdigest()


def load_or_compile(jitted: Callable, args: tuple, out_tree: Any, directory: str,
                    closure: str) -> tuple[Callable, bool]:
    """(the compiled step, whether it was loaded). `jitted` compiled for `args`, or the executable
    a run before compiled under the same key. `out_tree`, the tree of the step's outputs, is
    given, not traced: it is checked against the compiled step's when compiling. With several
    processes, all load or all compile, so that they run one program."""
    name = os.path.join(directory, f"{key(args, closure)}.process{jax.process_index()}")
    compiled = _load(name, args, out_tree)
    if _on_every_process(compiled is not None):
        return compiled, True
    compiled = jitted.lower(*args).compile()
    if compiled.out_tree != out_tree:
        raise ValueError(f"the step's outputs are {compiled.out_tree}, not the {out_tree} given")
    try:
        _keep(serialize_executable.serialize(compiled)[0], name)
    except Exception as error:  # a full disk, a backend that cannot serialise: the run goes on
        logging.warning("The compiled step could not be kept in %s (%s); the run goes on",
                        directory, _first_line(error))
    return compiled, False


def _load(name: str, args: tuple, out_tree: Any) -> Callable | None:
    """The step kept in `name` if there is one that loads and takes `args`; else None."""
    if not os.path.exists(name):
        return None
    try:
        with open(name, "rb") as f:
            compiled = serialize_executable.deserialize_and_load(
                f.read(), jax.tree.structure((args, {})), out_tree)
        leaves, infos = jax.tree.leaves(args), jax.tree.leaves(compiled.args_info)
        # The step's own record of its arguments' shapes and types: a step that would fail at
        # its first call, at every restart, is compiled afresh instead. (Placements are in the
        # key: a loaded step lists only those of the arguments it reads.)
        if len(infos) != len(leaves) or any(i.shape != x.shape or i.dtype != x.dtype
                                            for i, x in zip(infos, leaves)):
            raise ValueError("it takes other arguments than these")
        return compiled
    except Exception as error:  # a truncated or foreign file: compiled afresh and replaced
        logging.warning("The compiled step %s could not be loaded (%s); compiling it", name,
                        _first_line(error))
        return None


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.array(ok)).all())


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _keep(payload: bytes, name: str) -> None:
    """Writes `payload` to `name`, and removes this process's steps of other keys (other code,
    configs or shapes) and files left half-written, so that the directory holds one step per
    process. Written aside, flushed to disk and renamed: a run killed meanwhile leaves no
    partial step under a step's name."""
    directory, base = os.path.split(name)
    os.makedirs(directory, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=directory, prefix=f"{base}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    process = base[base.index(".process"):]
    for other in os.listdir(directory):
        if other != base and (other.endswith(process) or (
                f"{process}." in other and other.endswith(".partial"))):
            with contextlib.suppress(FileNotFoundError):  # another writer's, gone meanwhile
                os.remove(os.path.join(directory, other))
