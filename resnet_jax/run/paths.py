"""The run's directory, local or in a bucket (`gs://...`), through one path layer: `etils.epath`.

Orbax and JAX's compilation cache reach a bucket through the same layer; everything else the run
writes (config.json, metrics.jsonl) goes through the functions here. Object stores cannot
append or rename in place: files are written whole, the new text replacing the old one.
"""

import os
import re

import fsspec
from etils import epath

# The fsspec package that serves each scheme epath knows beyond gs:// with TensorFlow.
_FILE_SYSTEMS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}


class WorkdirError(ValueError):
    """A workdir that cannot be used; nothing has been written to it."""


def _scheme(path: str) -> str | None:
    match = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", path)
    return match.group(1) if match else None


def resolve(path: str) -> epath.Path:
    """`path` as an epath.Path: a URL as it is, a local path made absolute (processes started in
    other directories name the same place). Raises WorkdirError for a scheme nothing serves."""
    scheme = _scheme(path)
    try:
        resolved = epath.Path(path)
        if scheme is None:
            return resolved.expanduser().resolve()
        # An unserved scheme fails only once the path is used; a missing bucket not even then
        # (a bucket's "directories" are only names), so its root is looked at.
        bucket = epath.Path(f"{scheme}://{path[len(scheme) + 3:].split('/')[0]}")
        if not bucket.exists():
            raise WorkdirError(f"{path!r}: the bucket {str(bucket)!r} does not exist, or these "
                               f"credentials cannot see it")
    except WorkdirError:
        raise
    except KeyError:
        raise WorkdirError(_unserved(path, scheme)) from None
    except Exception as error:  # TensorFlow's and fsspec's errors share no base class
        if "not implemented" in str(error) or isinstance(error, ImportError):
            raise WorkdirError(_unserved(path, scheme)) from None
        raise WorkdirError(f"{path!r} cannot be reached: {_first_line(error)}") from None
    return resolved


def _unserved(path: str, scheme: str | None) -> str:
    package = _FILE_SYSTEMS.get(scheme or "")
    install = f"pip install {package}" if package else "use a local path, gs:// or s3://"
    return f"{path!r}: no installed file system serves {scheme}:// URLs ({install})"


def _first_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def write_text(path: epath.Path, text: str) -> None:
    """Writes `text` whole: on a local disk through a temporary file renamed over `path`, so a
    reader never sees half of it; an object store replaces an object in one put already."""
    write_bytes(path, text.encode())


def write_bytes(path: epath.Path, data: bytes) -> None:
    """`write_text` for bytes."""
    if _scheme(str(path)) is None:
        temporary = path.with_name(path.name + ".tmp")
        try:
            temporary.write_bytes(data)
            temporary.replace(path)
        except BaseException:  # a full disk, Ctrl-C: no half-written file left beside it
            temporary.unlink(missing_ok=True)
            raise
    else:
        path.write_bytes(data)


def create_new(path: epath.Path, text: str) -> bool:
    """Writes `text` to `path` only if no file is there, atomically: True if written, False if
    one was. epath opens no file exclusively, so this goes below it: O_EXCL on a local disk, a
    create-only put (GCS's ifGenerationMatch=0) through the bucket's fsspec file system."""
    if _scheme(str(path)) is None:
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        return True
    file_system, location = fsspec.core.url_to_fs(str(path))
    try:
        with file_system.open(location, "xb") as file:
            file.write(text.encode())
    except FileExistsError:
        return False
    return True
