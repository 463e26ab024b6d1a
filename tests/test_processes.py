"""Worker processes die with their parent: a killed run leaves nothing running, and nothing holding its stderr
(a wrapper reading it to the end would hang). Real processes, real signals; Linux (/proc) only."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from conftest import write_dataset

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")

GRACE_S = 5.0


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "xfeat", *map(str, args)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Enough work that the workers are still busy when the run is killed."""
    root = tmp_path_factory.mktemp("processes") / "data"
    return write_dataset(root, {"B1": {"normal": 30}, "B2": {"normal": 20, "abnormal": 10}}, (256, 128))


@contextmanager
def _started(args: list[str]) -> Iterator[subprocess.Popen]:
    """A process in a session of its own, whose whole group is killed afterwards whatever the test did."""
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        yield process
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        with suppress(subprocess.TimeoutExpired):  # never hang the suite on a pipe something still holds
            process.communicate(timeout=30)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ignores_sigint(pid: int) -> bool:
    """Whether ``pid`` has run its worker initialiser (which makes it ignore SIGINT)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & (1 << (signal.SIGINT - 1)))


def _ready_workers(process: subprocess.Popen, marker: str, count: int, timeout: float = 90) -> list:
    """Wait until ``process`` has ``count`` children whose command line holds ``marker``, all initialised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before its workers were up: {process.stderr.read()!r}"
        try:
            workers = [c for c in psutil.Process(process.pid).children() if marker in " ".join(c.cmdline())]
        except psutil.Error:
            workers = []
        if len(workers) >= count and all(_ignores_sigint(w.pid) for w in workers):
            return workers
        time.sleep(0.05)
    raise AssertionError(f"no {count} initialised workers ({marker}) after {timeout} s")


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _kill_and_check_nothing_survives(process: subprocess.Popen, how: signal.Signals = signal.SIGKILL) -> None:
    descendants = {}  # workers and resource trackers
    for p in psutil.Process(process.pid).children(recursive=True):
        with suppress(psutil.Error):
            descendants[p.pid] = " ".join(p.cmdline())[:100]
    process.send_signal(how)
    process.wait(timeout=60)

    def survivors() -> list[str]:
        return [f"{pid} {cmd}" for pid, cmd in descendants.items() if _alive(pid)]

    assert _wait_until(lambda: not survivors(), GRACE_S), f"still running {GRACE_S} s after the parent: {survivors()}"
    process.communicate(timeout=GRACE_S)  # stderr reaches its end: no process holds it any more


def test_kill_9_of_extract_takes_its_decoding_workers_down(tmp_path, data):
    args = _cli("extract", data, "--cache", tmp_path / "c.h5", "--backbone", "resnet18", "--weights", "none",
                "--size", "128x64", "--methods", "m1", "--flips", "1", "--batch-size", "1", "--workers", "2",
                "--jobs", "1", "--device", "cpu", "--quiet")
    with _started(args) as process:
        _ready_workers(process, "popen_loky", 2)  # loky's decoding workers (not its resource tracker)
        # Workers inherit an ignored SIGINT before their initialiser runs: a first batch proves they ran it.
        assert _wait_until(lambda: any((tmp_path / "c.h5.journal").glob("*.npz")), 120)
        _kill_and_check_nothing_survives(process)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killing_convert_takes_its_loky_workers_down(tmp_path, data, how):
    """loky keeps idle workers for 300 s, and a worker blocked on a dead parent's queue forever."""
    with _started(_cli("convert", data, "--method", "m2", "--out", tmp_path / "out", "--jobs", "2",
                       "--quiet")) as process:
        _ready_workers(process, "popen_loky", 2)  # loky's workers (not its resource tracker)
        assert _wait_until(lambda: any((tmp_path / "out").rglob("*.png")), 120)  # initialisers have run
        _kill_and_check_nothing_survives(process, how)


CHILD = ("import sys, time\n"
         "from xfeat.io.processes import init_worker\n"
         "init_worker(int(sys.argv[1]), sys.argv[2] == 'pdeathsig')\n"
         "print('ready', flush=True)\n"
         "time.sleep(120)\n")
PARENT = ("import os, subprocess, sys, time\n"
          "child = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid()), sys.argv[2]])\n"
          "print(child.pid, flush=True)\n"
          "time.sleep(120)\n")


@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_a_worker_whose_parent_dies_exits_on_its_own(mode):
    """Linux's parent-death signal, and the watchdog thread used elsewhere (and for workers that a thread
    other than the main one started)."""
    with _started([sys.executable, "-c", PARENT, CHILD, mode]) as parent:
        child = int(parent.stdout.readline())
        assert parent.stdout.readline() == b"ready\n"
        assert _ignores_sigint(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_until(lambda: not _alive(child), GRACE_S)


@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_a_worker_whose_parent_died_while_it_started_exits_at_once(mode):
    """The parent may die before the worker asks to be told: the worker finds it already re-parented."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    result = subprocess.run([sys.executable, "-c", CHILD, str(gone.pid), mode], capture_output=True, timeout=60)
    assert (result.returncode, result.stdout) == (1, b"")


def _worker_state(chunk):
    return [(os.getppid(), signal.getsignal(signal.SIGINT))]


def test_map_chunks_workers_are_tied_and_leave_ctrl_c_to_the_parent():
    from joblib import parallel_config

    from xfeat.io.parallel import map_chunks

    results = [r for _, rs in map_chunks(_worker_state, list(range(8)), jobs=2) for r in rs]
    assert results and all(r == (os.getpid(), signal.SIG_IGN) for r in results)
    with parallel_config(backend="threading"):  # a caller's own backend is left alone
        assert [r for _, rs in map_chunks(_worker_state, list(range(8)), jobs=2) for r in rs] == [
            (os.getppid(), signal.getsignal(signal.SIGINT))] * 8


def test_a_caller_that_stops_at_the_first_bad_chunk_gets_no_remark_from_joblib(recwarn):
    from xfeat.io.parallel import map_chunks

    def scan() -> str:
        try:
            for chunk, _ in map_chunks(_worker_state, list(range(64)), jobs=2, chunk_size=1):
                if chunk[0] == 1:  # as a scan stops at the first unreadable file, with finished chunks waiting
                    time.sleep(0.5)
                    raise ValueError("unreadable")
        except ValueError as e:
            return str(e)
        return ""

    assert scan() == "unreadable"
    gc.collect()  # joblib remarks when its generator is collected
    assert not [w for w in recwarn if "input task iterator" in str(w.message)]
