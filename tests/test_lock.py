"""One run per workdir: the lock refuses a second run, and is taken over from one that is gone."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from resnet_jax import lock
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
