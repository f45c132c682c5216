"""Shared fixtures: unique keys, and a check that nothing is left in /dev/shm."""

from __future__ import annotations

import gc
import os
import re
import secrets
from typing import Iterator

import pytest

import shmarray

# The segment directory under test: SHMARRAY_DIR when a run sets it (tests/test_second_dir.py).
SHM = os.environ.get("SHMARRAY_DIR") or "/dev/shm"
# Objects that other libraries make (stdlib SharedMemory, posix_ipc) live in /dev/shm whatever shmarray uses.
needs_dev_shm = pytest.mark.skipif(SHM != "/dev/shm", reason="about objects other libraries make in /dev/shm")
_OURS = ("shmarray_", ".shmarray-tmp-")


_OTHER_RUN = re.compile(r"^shmarray_[a-z]+-(\d+)-[0-9a-f]{12}")
# Entries of a `python -m benchmarks` run (its own cleanup removes them): plain
# files, shmarray segments and POSIX semaphores named shmbench-<pid>-...
_BENCH_RUN = re.compile(r"^(?:shmarray_|sem\.)?shmbench-(\d+)-")


def _ours() -> set[str]:
    """shmarray entries of this test run (keys made by new_key carry our pid)."""
    mark = f"-{os.getpid()}-"
    try:
        return {n for n in os.listdir(SHM) if n.startswith(_OURS) and mark in n}
    except FileNotFoundError:  # pragma: no cover
        return set()


def _another_runs(name: str) -> bool:
    """True for a test key of another pytest process (several may run at once on a dev machine)."""
    m = _OTHER_RUN.match(name) or _BENCH_RUN.match(name)
    if m:
        return int(m.group(1)) != os.getpid()
    # The notebooks' keys are fixed names; another process executing them holds their lock.
    from _notebooks import is_notebook_entry, running_elsewhere

    return is_notebook_entry(name) and running_elsewhere()


def new_key(prefix: str = "t") -> str:
    """A key no other test or run uses."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(6)}"


@pytest.fixture
def key() -> Iterator[str]:
    """A unique key; whatever segment it names is removed after the test."""
    k = new_key()
    yield k
    gc.collect()
    try:
        shmarray.unlink(k)
    except shmarray.NotFoundError:
        pass


@pytest.fixture
def make_key() -> Iterator["object"]:
    """A factory of unique keys, all cleaned up after the test."""
    made: list[str] = []

    def make(prefix: str = "t") -> str:
        k = new_key(prefix)
        made.append(k)
        return k

    yield make
    gc.collect()
    for k in made:
        try:
            shmarray.unlink(k)
        except shmarray.NotFoundError:
            pass


@pytest.fixture(autouse=True)
def _no_leak_per_test() -> Iterator[None]:
    """Each test leaves no shmarray object behind in /dev/shm."""
    before = _ours()
    yield
    gc.collect()
    leaked = _ours() - before
    for name in leaked:
        try:
            os.unlink(os.path.join(SHM, name))
        except FileNotFoundError:
            pass
    assert not leaked, f"test leaked /dev/shm entries: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """No child process outlives its test."""
    yield
    from _procs import reap_all

    reap_all()


@pytest.fixture(scope="session", autouse=True)
def _dev_shm_unchanged() -> Iterator[None]:
    """The whole run leaves the /dev/shm listing as it found it."""
    before = set(os.listdir(SHM))
    yield
    gc.collect()
    # Memory this process kept for reuse goes at exit; the run must leave nothing either way.
    from shmarray._reuse import kept_files

    kept_files.release_all()
    # Judged by this run's own names only (its keys and temporary names carry its pid): a
    # user's notebook or pipeline may make and remove shmarray segments while the tests run.
    mark = f"-{os.getpid()}-"
    left = {n for n in set(os.listdir(SHM)) - before if mark in n and not _another_runs(n)}
    if left:  # give a concurrent run's transient objects a moment to go
        import time

        time.sleep(1.0)
        left &= set(os.listdir(SHM))
    assert not left, f"the test run left entries in /dev/shm: {sorted(left)}"


@pytest.fixture
def unwatched(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As where no watcher runs (SHMARRAY_WATCH=0, an older shmarray): what a death leaves stays until someone looks.

    This process lets go of its watcher (which then ends: nobody else is
    connected), so no sweep runs during the test; spawned children inherit
    the switch. The next test gets a watcher again on first need.
    """
    from shmarray import _watch

    monkeypatch.setenv("SHMARRAY_WATCH", "0")
    _watch._drop()
    yield
