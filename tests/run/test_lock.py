"""One run per workdir: the lock refuses a second run, and is taken over from one that is gone."""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from resnet_jax.run import lock, validate
from runs import REPO, main_command


def _write_lock(workdir, **fields):
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "refreshed": time.time(), "token": "theirs", **fields}
    (workdir / lock.NAME).write_text(json.dumps(holder))


def test_a_held_workdir_is_refused_naming_the_holder_and_released_after(tmp_path):
    workdir = epath.Path(tmp_path)
    with lock.held(workdir):
        holder = json.loads((workdir / lock.NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(lock.WorkdirLocked, match=rf"^another run holds the workdir: host "
                           rf"{socket.gethostname()}, pid {os.getpid()}, started .* UTC"):
            with lock.held(workdir):
                pass
        assert (workdir / lock.NAME).exists()  # the refusal left the holder's lock alone
    assert not (workdir / lock.NAME).exists()


def test_the_lock_is_refreshed_while_held(tmp_path):
    workdir = epath.Path(tmp_path)
    with lock.held(workdir, refresh_seconds=0.05):
        first = json.loads((workdir / lock.NAME).read_text())["refreshed"]
        time.sleep(0.5)
        assert json.loads((workdir / lock.NAME).read_text())["refreshed"] > first


@pytest.mark.parametrize("fields, reason", [
    ({"pid": 2**22 + 12345}, "no longer exists"),             # this host, no such process
    ({"host": "elsewhere", "refreshed": time.time() - 3600}, "not refreshed for"),
])
def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, caplog, fields, reason):
    workdir = epath.Path(tmp_path)
    _write_lock(tmp_path, **fields)
    with lock.held(workdir):
        assert json.loads((workdir / lock.NAME).read_text())["pid"] == os.getpid()
    assert "Taking over" in caplog.text and reason in caplog.text


@pytest.mark.slow
def test_the_main_job_refuses_a_held_workdir_in_one_line(tmp_path):
    # Held by a live process of this host (this test's own), refreshed just now.
    tmp_path.mkdir(exist_ok=True)
    _write_lock(tmp_path)
    result = subprocess.run(main_command(tmp_path), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("resnet_jax: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert f"pid {os.getpid()}" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.NAME]  # nothing written


def _garble(workdir, text, age):
    """A lock that is no holder's JSON (cut short, overwritten), last written `age` s ago."""
    path = workdir / lock.NAME
    path.write_text(text)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


@pytest.mark.parametrize("text", ['{"host": "elsewhere", "pid": 1', "", "{}", '["not", "a", "holder"]'])
def test_an_unreadable_lock_written_recently_is_refused_as_maybe_held(tmp_path, text):
    # Its holder may be alive and refreshing it: nothing but its age tells.
    path = _garble(tmp_path, text, age=30)
    with pytest.raises(lock.WorkdirLocked, match=rf"^the lock {path} is unreadable but was written "
                       rf"\d+ s ago.*wait {lock.STALE_SECONDS:.0f} s.*or remove it"):
        with lock.held(epath.Path(tmp_path)):
            pass
    assert path.read_text() == text  # left as it was


@pytest.mark.parametrize("text", ['{"host": "elsewhere", "pid": 1', "{}"])
def test_an_unreadable_lock_not_written_for_long_is_taken_over(tmp_path, caplog, text):
    _garble(tmp_path, text, age=lock.STALE_SECONDS + 60)
    with lock.held(epath.Path(tmp_path)):
        assert json.loads((tmp_path / lock.NAME).read_text())["pid"] == os.getpid()
    assert "Taking over" in caplog.text and "unreadable and was not written for" in caplog.text
    assert not (tmp_path / lock.NAME).exists()


def test_a_lock_that_cannot_be_created_is_one_line_naming_it(tmp_path, monkeypatch):
    def full_disk(path, text):  # as a full disk does: the file created, its text cut short
        path.write_text(text[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.paths, "create_new", full_disk)
    path = tmp_path / lock.NAME
    with pytest.raises(validate.SetupError, match=rf"^could not create the lock {path}: .*No space left"):
        with lock.held(epath.Path(tmp_path)):
            pass
    assert not path.exists()  # what the failed write left would keep the next run out
