"""The in-house runner: repeats, warm-up, interleaving, statistics, warm workers, cleanup.

Why not pyperf or pytest-benchmark: most figures here cross a process
boundary (a segment made here, attached in a process that is already
running and waiting on a pipe). pyperf runs every benchmark in worker
processes of its own and calibrates loops itself, so a cross-process setup
(a peer process that must stay warm across loops, an inherited lock or
queue) does not fit it; pytest-benchmark times in-process callables only.
This module is small: a sample is whatever a method's callable says it
took (timed where it matters: in the consumer, in the producer, or end to
end), methods are measured round-robin so load drift on a shared machine
hits every method alike, and each figure is a median with its IQR and
min-max over the repeats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import multiprocessing as mp
import multiprocessing.connection
import os
import secrets
import signal
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Iterator

__all__ = [
    "Stats",
    "Row",
    "GroupResult",
    "Context",
    "Worker",
    "Cleanup",
    "interleave",
    "recording",
    "BLOCK",
    "have",
    "version_of",
]

SHM = "/dev/shm"
MP = mp.get_context("spawn")


@dataclasses.dataclass(frozen=True)
class Stats:
    """Median and spread of one method's samples (seconds, or ns for per-op rows)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> "Stats":
        """The statistics of *samples* (at least one)."""
        xs = sorted(samples)
        if len(xs) >= 2:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        else:
            q1 = q3 = xs[0]
        return cls(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs))


@dataclasses.dataclass
class Row:
    """One method at one size (size None for unsized groups) or one named variant."""

    method: str
    samples: list[float]
    size: int | None = None
    unit: str = "s"  # "s" per operation/handoff, or "ns" per op for the lock group
    variant: str = ""  # a second axis for unsized groups (lock: uncontended / contended)
    role: str = "peer"  # "shmarray", "peer" or "floor"
    note: str = ""
    error: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def stats(self) -> Stats | None:
        """Statistics, None when the method failed before giving a sample."""
        return Stats.of(self.samples) if self.samples else None


@dataclasses.dataclass
class GroupResult:
    """What a group measured, the peers it skipped, and its headline ratios."""

    name: str
    title: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    headlines: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    throughput: bool = False  # sized groups: plot and tabulate GB/s rather than time

    def row(self, method: str, size: int | None = None, variant: str = "") -> Row | None:
        """The row of *method* at *size* / *variant*, None if absent or failed."""
        for r in self.rows:
            if r.method == method and r.size == size and r.variant == variant and r.samples:
                return r
        return None

    def median(self, method: str, size: int | None = None, variant: str = "") -> float | None:
        """The median of a row, None if the row is absent or failed."""
        r = self.row(method, size, variant)
        return None if r is None else Stats.of(r.samples).median

    def ratios(self, ours: str, peer: str, sizes: list[int]) -> list[tuple[int, float]]:
        """(size, peer median / our median) at each size where both were measured."""
        out = []
        for s in sizes:
            a, b = self.median(ours, s), self.median(peer, s)
            if a is not None and b is not None and a > 0:
                out.append((s, b / a))
        return out

    def headline(self, aim: str, ratio: float | None, target: str, ok: bool | None, detail: str,
                 unit: str = "x") -> None:
        """Record a headline figure (an aim of the project, measured in this run): a ratio, or a value in *unit*."""
        self.headlines.append(
            {"group": self.name, "aim": aim, "ratio": ratio, "target": target, "ok": ok, "detail": detail,
             "unit": unit}
        )


# -- cleanup -----------------------------------------------------------------------------


class Cleanup:
    """Everything a run creates is named with ``tag`` or registered here, and removed at the end.

    ``sweep()`` runs from a ``finally`` in ``__main__`` (so on Ctrl-C, SIGTERM
    and exceptions too): it runs the registered undo callables, then removes
    any /dev/shm entry that carries this run's tag and was not there before.
    """

    def __init__(self) -> None:
        self.tag = f"shmbench-{os.getpid()}"
        self._undo: dict[int, tuple[str, Callable[[], object]]] = {}
        self._next = 0
        try:
            self.before = set(os.listdir(SHM))
        except FileNotFoundError:  # pragma: no cover - no /dev/shm
            self.before = set()

    def name(self, what: str = "x") -> str:
        """A fresh name carrying this run's tag (usable as key, shm name, file name)."""
        return f"{self.tag}-{what}-{secrets.token_hex(4)}"

    def add(self, label: str, undo: Callable[[], object]) -> int:
        """Register *undo* (idempotent, may raise) to run at the sweep; returns a handle."""
        self._next += 1
        self._undo[self._next] = (label, undo)
        return self._next

    def done(self, handle: int, run: bool = True) -> None:
        """Run (or just forget) a registered undo now."""
        item = self._undo.pop(handle, None)
        if item is not None and run:
            _quiet(item[1])

    @contextlib.contextmanager
    def scope(self, label: str, undo: Callable[[], object]) -> Iterator[None]:
        """``with cleanup.scope(...)``: undo runs on exit, and at the sweep if exit never came."""
        h = self.add(label, undo)
        try:
            yield
        finally:
            self.done(h)

    def leftovers(self) -> list[str]:
        """/dev/shm entries of this run that are still there."""
        try:
            now = os.listdir(SHM)
        except FileNotFoundError:  # pragma: no cover
            return []
        return sorted(n for n in now if self.tag in n and n not in self.before)

    def sweep(self) -> list[str]:
        """Undo everything registered, then remove this run's tagged /dev/shm entries (returned)."""
        while self._undo:
            _, (_, undo) = self._undo.popitem()
            _quiet(undo)
        gc.collect()
        removed = []
        for n in self.leftovers():
            try:
                os.unlink(os.path.join(SHM, n))
                removed.append(n)
            except FileNotFoundError:
                pass
        return removed


def _quiet(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - cleanup of something already gone
        pass


# -- warm workers ------------------------------------------------------------------------

_INHERITED: dict[str, Any] = {}


def inherited(name: str) -> Any:
    """In a worker: an object handed over at spawn time (a Queue, a Lock)."""
    return _INHERITED[name]


def _worker_main(conn: multiprocessing.connection.Connection, objects: dict[str, Any]) -> None:
    # Ctrl-C goes to the whole process group: the parent owns the shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _INHERITED.update(objects)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        if fn is None:
            return
        try:
            out = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            out = ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        # The call's arguments (an unpickled array, a received tensor) must die
        # here, inside the call's own time: left alive until the next recv, their
        # release (a 512 MiB munmap: ~30 ms) landed in the next method's sample.
        del fn, args
        try:
            conn.send(out)
        except (BrokenPipeError, OSError):
            return
        del out


class Worker:
    """A spawned process waiting on a pipe: ``call(fn, *args)`` runs ``fn`` there.

    *fn* must be a module-level function (it travels by name). The process
    has imported what the first call needed, so later calls find it warm.
    """

    def __init__(self, **objects: Any) -> None:
        self._conn, child = MP.Pipe()
        self.process = MP.Process(target=_worker_main, args=(child, objects), daemon=True)
        self.process.start()
        child.close()

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
        """Run ``fn(*args)`` in the worker and return its result (raises on error or timeout)."""
        self.send(fn, *args)
        return self.result(timeout)

    def send(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` in the worker without waiting."""
        self._conn.send((fn, args))

    def result(self, timeout: float = 120.0) -> Any:
        """The result of the last ``send``."""
        if not self._conn.poll(timeout):
            self.close()
            raise TimeoutError(f"worker {self.process.pid} gave no answer within {timeout} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            code = self.process.exitcode
            raise RuntimeError(f"worker {self.process.pid} died (exit code {code})") from None
        if status == "err":
            raise RuntimeError(f"in worker {self.process.pid}: {value}")
        return value

    @property
    def conn(self) -> multiprocessing.connection.Connection:
        """The parent's end of the pipe (to send payloads through it)."""
        return self._conn

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        if self.process.is_alive():
            try:
                self._conn.send((None, ()))
            except OSError:
                pass
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the measuring loop ---------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What every group gets: mode, cleanup, logging."""

    quick: bool
    cleanup: Cleanup
    verbose: bool = True

    def log(self, msg: str) -> None:
        """Progress on stderr (stdout carries the tables)."""
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def reps(self, full: int, quick: int) -> int:
        """Repeats for this mode."""
        return quick if self.quick else full


BLOCK = 3
"""Calls of one method in a row per round: the first is dropped, the others recorded."""

_recording = False


def recording() -> bool:
    """True while ``interleave`` is making a call whose sample it keeps.

    A method that also keeps side figures (a per-phase split) appends them
    only when this is true, so they line up with the recorded samples.
    """
    return _recording


def interleave(
    ctx: Context,
    methods: dict[str, Callable[[], float]],
    reps: int,
    warmup: int = 1,
    budget_s: float | None = None,
    block: int = BLOCK,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Measure each method *reps* times, in rotating rounds of blocks, after *warmup* unrecorded rounds.

    The one measuring loop of every group (tests/test_benchmarks_smoke.py
    checks that no group has its own). Each callable returns the seconds
    (or ns) its own timed part took. A round calls every method in a block
    of its own: *block* calls in a row, the first dropped (it pays for
    switching from the previous method: caches, a worker's wake-up, pages
    another method left behind), the rest recorded. The order of the
    methods rotates every round so that no method always runs right after
    the same other one. Warm-up rounds call each method once, unrecorded.
    *block* 1 records every call (for a method whose every call must be
    the first of its kind, e.g. a fresh process). With *budget_s*, rounds
    stop early (never under 3 samples) once the recorded rounds used up the
    budget. A method that raises is dropped and its error kept: it is
    reported, never silently averaged.
    """
    global _recording
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block!r}")
    kept = block - 1 if block > 1 else 1
    rounds = -(-reps // kept)
    samples: dict[str, list[float]] = {m: [] for m in methods}
    errors: dict[str, str] = {}
    names = list(methods)
    start = time.perf_counter()
    for rnd in range(-warmup, rounds):
        live = [m for m in names if m not in errors]
        if not live:
            break
        k = rnd % len(live)
        for m in live[k:] + live[:k]:
            calls = 1 if rnd < 0 else block
            for i in range(calls):
                keep = rnd >= 0 and (block == 1 or i > 0) and len(samples[m]) < reps
                if rnd >= 0 and not keep and i > 0:
                    break  # this method has its reps: the rest of the block is not needed
                _recording = keep
                try:
                    value = methods[m]()
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - reported in the results
                    errors[m] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    ctx.log(f"    {m}: FAILED: {errors[m]}")
                    break
                finally:
                    _recording = False
                if keep:
                    samples[m].append(value)
        if rnd == -1:
            start = time.perf_counter()
        done = [len(samples[m]) for m in names if m not in errors]
        if budget_s is not None and rnd >= 0 and min(done, default=0) >= 3 and time.perf_counter() - start > budget_s:
            break
    return samples, errors


# -- peers -------------------------------------------------------------------------------------


def have(module: str) -> bool:
    """True when *module* can be imported here."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def version_of(dist: str) -> str | None:
    """The installed version of distribution *dist*, None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def human_size(n: int) -> str:
    """1 MiB, 64 MiB, 1 GiB ..."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def human_time(s: float) -> str:
    """Seconds as ns / us / ms / s with 3 significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover
