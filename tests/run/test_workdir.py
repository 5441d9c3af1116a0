"""The workdir's path layer: local paths and URLs alike, one-line errors for what cannot serve."""

import errno
import subprocess

import pytest

from resnet_jax.run import paths
from runs import REPO, main_command


def test_a_local_path_is_made_absolute_and_a_url_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve("run")) == str(tmp_path / "run")
    assert str(paths.resolve("~/x")).startswith("/")


@pytest.mark.parametrize("url, install", [("s3://bucket/run", "pip install s3fs"),
                                          ("foo://bucket/run", "use a local path, gs:// or s3://")])
def test_a_scheme_nothing_serves_is_named_with_what_to_install(url, install):
    with pytest.raises(paths.WorkdirError) as error:
        paths.resolve(url)
    message = str(error.value)
    assert "\n" not in message and f"{url.split(':')[0]}://" in message and install in message


def test_whole_file_writes_leave_no_temporary_file(tmp_path):
    path = paths.resolve(str(tmp_path)) / "config.json"
    paths.write_text(path, "one")
    paths.write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_write_that_fails_leaves_the_file_as_it_was_and_no_temporary_file(tmp_path, monkeypatch):
    path = paths.resolve(str(tmp_path)) / "config.json"
    paths.write_text(path, "one")
    real = type(path).write_bytes

    def full_disk(self, data):  # half written, then the disk is full
        real(self, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(path), "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        paths.write_text(path, "two, longer")
    assert path.read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.slow
def test_the_main_job_refuses_an_unserved_scheme_in_one_line_and_writes_nothing():
    before = set(REPO.iterdir())
    result = subprocess.run(main_command("s3://bucket/run"), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet_jax: error:") and "s3://" in last and "pip install s3fs" in last
    assert set(REPO.iterdir()) == before  # no local directory named "s3:"
