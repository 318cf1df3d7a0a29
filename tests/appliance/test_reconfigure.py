"""The reconfigure run around the engine: the lock between two runs, and the run log."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from appliance.errors import LockError
from appliance.reconfigure import RUN_LOGS_KEPT, RunLog, reconfigure_lock

HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    handle = open(sys.argv[1], "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.seek(0); handle.truncate(); handle.write(f"{os.getpid()}\\n"); handle.flush()
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_waits_for_the_first_and_says_for_whom(tmp_path):
    lock = tmp_path / "reconfigure.lock"
    holder = hold_lock(lock, 0.6)
    said: list[str] = []
    started = time.monotonic()
    with reconfigure_lock(lock, said.append, wait=10):
        waited = time.monotonic() - started
        assert lock.read_text().strip() == str(os.getpid())
    holder.wait()
    assert waited >= 0.3
    assert said == [f"reconfigure: waiting for the reconfigure run by pid {holder.pid} to finish"]


def test_a_run_that_holds_the_lock_too_long_is_a_clear_error(tmp_path):
    lock = tmp_path / "reconfigure.lock"
    holder = hold_lock(lock, 5)
    try:
        with pytest.raises(LockError, match=rf"pid {holder.pid}.*wait for it or stop it"):
            with reconfigure_lock(lock, lambda line: None, wait=0.3):
                pytest.fail("the lock was taken while another run held it")
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_free_again_after_a_run_even_one_that_failed(tmp_path):
    lock = tmp_path / "reconfigure.lock"
    with pytest.raises(RuntimeError):
        with reconfigure_lock(lock, lambda line: None, wait=0.1):
            raise RuntimeError("a resource failed")
    with reconfigure_lock(lock, lambda line: None, wait=0.1):
        pass


def test_run_log_keeps_what_was_printed_and_only_the_newest_runs(tmp_path, capsys):
    directory = tmp_path / "log" / "reconfigure"
    for i in range(RUN_LOGS_KEPT + 5):
        log = RunLog(sys.stdout, directory)
        log(f"run {i}")
        log("reconfigure: 0/41 resources updated in 0.05 s")
        saved = log.save()
        time.sleep(0.001)  # names carry microseconds; keep them distinct and ordered
    assert (
        saved.read_text() == f"run {RUN_LOGS_KEPT + 4}\nreconfigure: 0/41 resources "
        f"updated in 0.05 s\n"
    )
    assert saved.stat().st_mode & 0o777 == 0o600
    kept = sorted(directory.glob("*.log"))
    assert len(kept) == RUN_LOGS_KEPT
    assert kept[0].read_text().startswith("run 5\n")
    assert "run 0" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system takes root")
def test_a_full_log_file_system_is_said_in_one_sentence_not_a_traceback(tmp_path, capsys):
    directory = tmp_path / "log"
    directory.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        filler = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"x" * 4096):  # to the last block
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
        log = RunLog(sys.stdout, directory / "reconfigure")
        log("reconfigure: 0/41 resources updated in 0.05 s")
        assert log.save() is None
        out = capsys.readouterr().out
        assert out == (
            "reconfigure: 0/41 resources updated in 0.05 s\n"
            f"The log of this run could not be kept in {directory}/reconfigure: "
            "No space left on device.\n"
        )
    finally:
        subprocess.run(["umount", str(directory)])
