"""One writer per run and per study: a busy directory is refused with its holder named, a dead holder's
lock is taken over, and the workers of a killed study stop with it."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import flopmatch.lock as lock_module
from flopmatch.errors import UserError
from flopmatch.lock import LOCK_NAME, DirectoryLock, holder, is_locked
from flopmatch.rundir import METRICS, read_state
from flopmatch.train import train
from tiny import tiny_run_config

TESTS = Path(__file__).resolve().parent
LONG = 150  # steps of the run that holds the lock in a subprocess (a few seconds)

TRAINER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from flopmatch.train import train
    from tiny import tiny_run_config
    train(tiny_run_config("masked", {steps}, sets=["train.log_every=1", "train.checkpoint_every=50"]), {out!r}, progress=False)
""")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder_and_the_first_finishes(tmp_path):
    """While one process trains a run, a second `train` on it fails at once naming the first; the first is unharmed."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", TRAINER.format(tests=str(TESTS), steps=LONG, out=str(out))],
                             stderr=subprocess.PIPE, text=True)
    # polled by the holder record (written once the lock is held), not is_locked(), which takes the lock for an instant
    _wait(lambda: (holder(out) or {}).get("pid") == first.pid or first.poll() is not None, 60,
          "the first trainer to take the lock")
    assert first.poll() is None, first.stderr.read()
    with pytest.raises(UserError, match=rf"in use: pid {first.pid} on .*writing this run"):
        train(tiny_run_config("masked", LONG, sets=["train.log_every=1", "train.checkpoint_every=50"]), out, progress=False)
    assert first.poll() is not None or is_locked(out)  # the refused writer left the holder's lock alone
    assert first.wait(timeout=120) == 0, first.stderr.read()
    steps = [json.loads(line)["step"] for line in (out / METRICS).read_text().splitlines()]
    assert steps == list(range(1, LONG + 1)) and read_state(out)["done"]
    assert not is_locked(out) and holder(out) is None  # released cleanly: no holder left behind


def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    """A lock file left by a process that no longer runs does not block; the new writer says whose it was."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": "here", "pid": dead.pid, "command": "flopmatch train", "since": 0}))
    assert train(tiny_run_config("masked", 2), out, progress=False)["done"]
    assert f"taking over the lock of pid {dead.pid}" in capsys.readouterr().err


def test_lock_is_exclusive_within_and_across_processes(tmp_path):
    """A held lock refuses a second holder in another process; released, it can be taken again."""
    probe = f"from flopmatch.lock import DirectoryLock\nwith DirectoryLock({str(tmp_path)!r}, 'run'): pass"
    with DirectoryLock(tmp_path, "run"):
        assert is_locked(tmp_path) and holder(tmp_path)["pid"] == os.getpid()
        other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert other.returncode == 1 and f"pid {os.getpid()}" in other.stderr
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def _workers_of(out: Path) -> list[int]:
    """Pids of study worker processes whose job file is under ``out``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flopmatch.study.worker" in cmd and any(str(out).encode() in part for part in cmd):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_killed_study_parent_leaves_no_worker_running(tmp_path):
    """SIGKILL of a `study --workers 2` parent stops its workers within seconds and frees every run's lock."""
    out = tmp_path / "study"
    parent = subprocess.Popen([sys.executable, "-m", "flopmatch", "study", "--preset", "tiny", "--workers", "2",
                               "--objectives", "masked", "--no-calibrate", "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = lambda: (out / "runs").is_dir() and any((out / "runs").iterdir())  # noqa: E731
    _wait(lambda: (_workers_of(out) and started()) or parent.poll() is not None, 120, "the workers to start runs")
    assert parent.poll() is None
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # seconds when idle; the bound is generous because on a loaded 2-core CI machine with a cold cache a worker may be
    # inside a long native call (feature extraction, a classifier step) when SIGINT arrives. A worker that ignored its
    # parent's death would still be running after it.
    _wait(lambda: not _workers_of(out), 45, "the orphaned workers to stop")
    # nothing still writes; a run stopped before its config is removed (and runs/ with it, when that leaves it empty)
    runs = [p for p in (out / "runs").iterdir() if p.is_dir()] if (out / "runs").is_dir() else []
    assert not any(is_locked(r) for r in runs)


def test_run_being_created_is_reported_in_use_not_foreign(tmp_path):
    """A run whose writer holds the lock but has not written its config yet is 'in use', not 'not a run'."""
    out = tmp_path / "run"
    with DirectoryLock(out, "run"):
        (out / "config.json.tmp").write_text("")  # what the creating writer has put there so far
        with pytest.raises(UserError, match=rf"in use: pid {os.getpid()} on .*writing this run"):
            train(tiny_run_config("masked", 2), out, progress=False)
    with pytest.raises(UserError, match="not a flopmatch run directory"):  # unlocked debris is still refused
        train(tiny_run_config("masked", 2), out, progress=False)


def test_a_writer_is_not_refused_by_a_probe_holding_the_lock_for_an_instant(tmp_path, monkeypatch):
    """is_locked() tests the lock by taking it for an instant; a writer arriving then tries again (PROBE_RETRIES,
    PROBE_WAIT_S apart) instead of failing as "in use", while a holder that keeps the lock is still refused."""
    (tmp_path / LOCK_NAME).touch()
    probe = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a probe, caught while it holds the lock
    waits = []

    def probe_done(seconds: float) -> None:  # the writer's first wait: the probe lets go meanwhile
        waits.append(seconds)
        fcntl.flock(probe, fcntl.LOCK_UN)

    monkeypatch.setattr(lock_module.time, "sleep", probe_done)
    with DirectoryLock(tmp_path):
        assert holder(tmp_path)["pid"] == os.getpid()
    assert waits == [lock_module.PROBE_WAIT_S]  # refused once, then taken
    monkeypatch.undo()
    os.close(probe)
    with DirectoryLock(tmp_path), pytest.raises(UserError, match="in use"):
        with DirectoryLock(tmp_path):  # another open of the lock file while this one keeps it: refused after the retries
            pass
