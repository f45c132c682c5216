"""watch: what the watcher (``shmarray._watch`` / ``shmarray._reaper``) costs, against ``SHMARRAY_WATCH=0``.

In one run, with the watcher off as the baseline of the same run:

- the first ``share()`` of a small array in a fresh process (a new
  interpreter, numpy and shmarray imported before the clock, no watcher in
  its environment): on, it starts the tree's watcher (a posix_spawn, a
  socket; the watcher boots asynchronously, so this is what the caller
  waits); each sample a new process;
- a later ``share()`` in a warm process (steady state: one message on the
  connection per new attachment), each sample the mean of a batch of shares
  of new keys;
- a ``multiprocessing`` Pool of spawned workers (8; 2 in --quick) started
  from a fresh process that has shared one array, each worker attaching it
  in its initializer: the time from ``Pool()`` until every worker has
  attached, the processes under the pool's parent, the descriptors of each
  worker, and how many connections the watcher serves (one watcher for the
  tree: the workers find it through ``SHMARRAY_WATCHER``);
- a holder's SIGKILL until its segment and its kept files are gone from
  the directory (watcher on; off, a note says what is still there);
- the watcher's RSS (VmRSS) and CPU time (utime + stime) after N deaths.

All of it runs in a child process in a private mount namespace with a tmpfs
of its own on /dev/shm (root and unshare(1); elsewhere on the real /dev/shm,
with a note), so the directory holds the group's entries alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from .._harness import Cleanup, Context, GroupResult, Row, Worker, interleave

NAME = "watch"
TITLE = "The watcher: its cost against SHMARRAY_WATCH=0"

OFF = "watcher off (SHMARRAY_WATCH=0)"
ON = "watcher on"
V_FIRST = "first share() in a fresh process"
V_LATER = "later share() (warm process)"
V_POOL = "Pool start + every worker attached"
V_KILL = "SIGKILL -> segment and kept files gone"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHM = "/dev/shm"
SMALL = 512  # float64 elements: 4 KiB
KEPT = 1 << 17  # float64 elements: 1 MiB, dropped by the holder (kept for reuse)
OFF_WAIT = 2.0  # seconds the watcher-off holder's entries are watched after its SIGKILL

FIRST = """
import os, sys, time, json
import numpy as np, shmarray
a = np.ones({small})
key = "shmbench-watch-first-%d" % os.getpid()
t0 = time.perf_counter()
s = shmarray.share(key, a)
t1 = time.perf_counter()
assert float(s.sum()) == {small}
print(json.dumps({{"t": t1 - t0, "watcher": bool(os.environ.get("SHMARRAY_WATCHER"))}}), flush=True)
s.close()  # the last holder: the segment goes with it
"""

HOLDER = """
import os, sys, time
import numpy as np, shmarray
a = shmarray.share(sys.argv[1] + "-held", np.ones({small}))
b = shmarray.share(sys.argv[1] + "-dropped", np.ones({kept})); del b
print("ready", flush=True)
time.sleep(120)
"""


# -- in the pool's workers (module level: spawned workers import them by name) ------------------


def _pool_init(key: str, q: Any) -> None:
    global _ATTACHED
    import shmarray

    _ATTACHED = shmarray.attach(key)
    q.put((os.getpid(), len(os.listdir("/proc/self/fd")), float(_ATTACHED.sum())))


_ATTACHED: Any = None


def _noop(x: int) -> int:
    return x


def _descendants(pid: int) -> list[int]:
    """Every process below *pid* (by parent pid), as /proc shows them now."""
    kids: dict[int, list[int]] = {}
    for n in os.listdir("/proc"):
        if not n.isdigit():
            continue
        try:
            with open(f"/proc/{n}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(n))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _is_watcher(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"shmarray._reaper" in f.read()
    except OSError:
        return False


def _sockets(pid: int) -> int:
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
    except OSError:
        pass
    return n


def pool_sample(workers: int) -> None:
    """In a fresh process: share one array, start a spawn Pool whose workers attach it; print the figures."""
    import multiprocessing as mp

    import shmarray

    key = f"shmbench-watch-pool-{os.getpid()}"
    a = shmarray.share(key, np.ones(SMALL))
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    t0 = time.perf_counter()
    pool = ctx.Pool(workers, initializer=_pool_init, initargs=(key, q))
    got = [q.get() for _ in range(workers)]
    t1 = time.perf_counter()
    try:
        if any(s != SMALL for _, _, s in got) or len({p for p, _, _ in got}) != workers:
            raise RuntimeError(f"workers answered {got!r}")
        below = _descendants(os.getpid())
        watchers = [p for p in below if _is_watcher(p)]
        out = {"t": t1 - t0, "processes": len(below), "watchers": len(watchers),
               "watcher_sockets": _sockets(watchers[0]) if watchers else 0,
               "worker_fds": statistics.median(n for _, n, _ in got)}
    finally:
        pool.terminate()
        pool.join()
        a.close()
    print(json.dumps(out), flush=True)


# -- in the warm workers of the steady-state rows ---------------------------------------------


def share_batch(n: int) -> float:
    """Mean seconds of one share() of a new key (a new attachment: one message, watcher on), over *n*."""
    import shmarray

    a = np.ones(SMALL)
    keys = [f"shmbench-watch-later-{os.getpid()}-{time.perf_counter_ns()}-{i}" for i in range(n)]
    held = []
    t0 = time.perf_counter()
    for k in keys:
        held.append(shmarray.share(k, a))
    t1 = time.perf_counter()
    for s in held:
        s.close()  # the last holder: the segment goes with it
    return (t1 - t0) / n


# -- the group ----------------------------------------------------------------------------------


def run(ctx: Context) -> GroupResult:
    """Run the measurements in a private /dev/shm (when root), collect the samples and figures."""
    res = GroupResult(NAME, TITLE)
    args = [str(int(ctx.quick))]
    if os.geteuid() == 0 and shutil.which("unshare") is not None:
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               "mount -t tmpfs -o size=1g tmpfs /dev/shm && "
               f"exec {sys.executable} -m benchmarks.groups.watch {' '.join(args)}"]
        private = True
    else:
        cmd = [sys.executable, "-m", "benchmarks.groups.watch", *args]
        private = False
    env = {k: v for k, v in os.environ.items() if k not in ("SHMARRAY_WATCHER", "SHMARRAY_WATCH")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the measuring child failed ({out.returncode}): {out.stderr[-3000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    pool_n = data["pool_workers"]
    variants = {"first": V_FIRST, "later": V_LATER, "pool": V_POOL.replace("Pool", f"Pool({pool_n})"),
                "kill": V_KILL}
    for which, label in (("off", OFF), ("on", ON)):
        for part, variant in variants.items():
            name = f"{part} {which}"
            if name in data["samples"]:
                res.rows.append(Row(label, data["samples"][name], variant=variant, role="shmarray",
                                    error=data["errors"].get(name, "")))
    med = {k: statistics.median(v) for k, v in data["samples"].items() if v}
    for part, what in (("first", "first share() in a fresh process"), ("later", "a later share() (warm)"),
                       ("pool", f"Pool({pool_n}) start + attach")):
        on, off = med.get(f"{part} on"), med.get(f"{part} off")
        if on and off:
            res.headline(f"{what}: watcher on / off", on / off, "(no aim)", None,
                         f"on {_ms(on)} vs off {_ms(off)}; +{_ms(on - off)}")
    kill = med.get("kill on")
    if kill is not None:
        res.headline("SIGKILL of the only holder -> its segment and kept files gone / 1 s", kill / 1.0, "< 1",
                     kill < 1.0, f"median {_ms(kill)} over {len(data['samples']['kill on'])} deaths")
    w = data["watcher"]
    res.notes.append(
        f"The watcher (one process, `python -I -S` running shmarray._reaper): VmRSS {w['rss0_kb'] / 1024:.1f} MiB "
        f"once booted (after its first death), {w['rss_kb'] / 1024:.1f} MiB after {w['deaths']} deaths; "
        f"CPU time (utime + stime) {w['cpu0_s'] * 1e3:.0f} ms once booted, {w['cpu_s'] * 1e3:.0f} ms after "
        f"{w['deaths']} deaths ({(w['cpu_s'] - w['cpu0_s']) / max(1, w['deaths'] - 1) * 1e3:.2f} ms per death, "
        f"its 1 s sweeps included)"
        + (f"; idle with one process connected: {w['idle_cpu_ms_per_s']:.2f} ms of CPU per second."
           if w.get("idle_cpu_ms_per_s") is not None else "."))
    p = data["pool"]
    res.notes.append(
        f"Pool({pool_n}) of spawned workers, each attaching one array in its initializer (medians): processes "
        f"under the pool's parent {p['off']['processes']:g} off, {p['on']['processes']:g} on "
        f"({p['on']['processes'] - p['off']['processes']:+g}; watchers among them: {p['on']['watchers']:g}, "
        f"serving {p['on']['watcher_sockets'] - 1:g} connections: the parent and the {pool_n} workers); "
        f"descriptors per worker {p['off']['worker_fds']:g} off, {p['on']['worker_fds']:g} on "
        f"({p['on']['worker_fds'] - p['off']['worker_fds']:+g}).")
    res.notes.append(f"Watcher off (and no watcher running yet), SIGKILL of the only holder: {data['off_left']} "
                     f"of its {data['off_entries']} entries still in the directory {OFF_WAIT:g} s later; "
                     f"{data['off_later_left']} left at the end, once this run's own watcher (started after) "
                     "had swept the directory every second.")
    res.notes.append("first share(): a new interpreter per sample, numpy and shmarray imported before the clock, "
                     f"a {SMALL * 8 // 1024} KiB array; later share(): a warm spawned worker, each sample the mean "
                     f"of {data['batch']} shares of new keys (each held until the batch ends). The holder of the "
                     "SIGKILL rows: a new interpreter that shares a 4 KiB array it keeps and a 1 MiB one it drops "
                     "(kept for reuse); the clock runs from the kill until none of its entries is listed "
                     "(polled every 1 ms).")
    if not private:
        res.notes.append("Not root or no unshare(1): measured on the real /dev/shm (other entries there may "
                         "be swept by the watcher's 1 s sweeps too).")
    return res


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"


def _proc_figures(pid: int) -> tuple[int, float]:
    """VmRSS (KiB) and utime + stime (s) of *pid*."""
    rss = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _gone(names: set[str], t0: float, timeout: float) -> float | None:
    """Seconds from *t0* until none of *names* is listed in /dev/shm (None past *timeout*)."""
    while time.perf_counter() - t0 < timeout:
        if not names & set(os.listdir(SHM)):
            return time.perf_counter() - t0
        time.sleep(0.001)
    return None


def _measure(quick: bool) -> dict[str, Any]:
    """In the private /dev/shm: every row, interleaved, and the watcher's figures."""
    import shmarray
    from shmarray import _watch

    reps_first, reps_later, reps_pool, reps_kill = (3, 3, 3, 3) if quick else (15, 15, 5, 9)
    pool_workers = 2 if quick else 8
    batch = 20 if quick else 100
    bulk = 10 if quick else 100
    py = sys.executable
    tree_env: list[dict[str, str]] = [{}]
    base_env = {k: v for k, v in os.environ.items() if k not in (_watch.ENV, _watch.SWITCH)}
    env_off = dict(base_env, **{_watch.SWITCH: "0"})

    holder = HOLDER.format(small=SMALL, kept=KEPT)
    counter = [0]
    off_result: dict[str, Any] = {}

    def kill(on: bool) -> float:
        counter[0] += 1
        before = set(os.listdir(SHM))
        p = subprocess.Popen([py, "-c", holder, f"shmbench-watch-h{counter[0]}"], stdout=subprocess.PIPE,
                             text=True, env=tree_env[0] if on else env_off, cwd=ROOT)
        line = p.stdout.readline().strip()
        if line != "ready":
            p.kill()
            p.wait()
            raise RuntimeError(f"holder said {line!r}")
        new = set(os.listdir(SHM)) - before
        t0 = time.perf_counter()
        p.kill()
        p.wait()
        p.stdout.close()
        if not on:
            time.sleep(OFF_WAIT)
            left = new & set(os.listdir(SHM))
            off_result.update(off_left=len(left), off_entries=len(new), off_names=sorted(new))
            return 0.0
        took = _gone(new, t0, 5.0)
        if took is None:
            raise RuntimeError(f"still there 5 s after the kill: {sorted(new & set(os.listdir(SHM)))}")
        return took

    # Watcher off: no watcher anywhere yet (a watcher's 1 s sweep of /dev/shm would free it too).
    kill(False)

    # This process's own watcher: the holders below are its children and share it.
    os.environ.pop(_watch.SWITCH, None)
    mine = shmarray.share("shmbench-watch-own", np.ones(SMALL))
    watcher = _watch._child
    if not watcher or not os.environ.get(_watch.ENV):
        raise RuntimeError("no watcher started")
    tree_env[0] = dict(os.environ)

    def fresh(code: str, env: dict[str, str], *args: str) -> dict[str, Any]:
        out = subprocess.run([py, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=120)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-1500:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = FIRST.format(small=SMALL)

    def first_share(on: bool) -> float:
        got = fresh(first, base_env if on else env_off)
        if got["watcher"] != on:
            raise RuntimeError(f"watcher {'not ' if on else ''}started")
        return got["t"]

    pool_figures: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}

    def pool(on: bool) -> float:
        got = fresh(f"from benchmarks.groups.watch import pool_sample; pool_sample({pool_workers})",
                    base_env if on else env_off)
        pool_figures["on" if on else "off"].append(got)
        return got["t"]

    # Warm workers for the steady state (environment fixed at their spawn).
    saved = dict(os.environ)
    try:
        os.environ.pop(_watch.ENV, None)
        w_on = Worker()
        os.environ[_watch.SWITCH] = "0"
        w_off = Worker()
    finally:
        os.environ.clear()
        os.environ.update(saved)

    quiet = Context(quick=quick, cleanup=Cleanup(), verbose=False)
    samples: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    try:
        # One death before any figure: the watcher has booted and served once.
        kill(True)
        rss0, cpu0 = _proc_figures(watcher)
        s, e = interleave(quiet, {"first off": lambda: first_share(False), "first on": lambda: first_share(True)},
                          reps=reps_first, warmup=1, block=1)
        samples.update(s), errors.update(e)
        s, e = interleave(quiet, {"later off": lambda: w_off.call(share_batch, batch),
                                  "later on": lambda: w_on.call(share_batch, batch)}, reps=reps_later, warmup=1)
        samples.update(s), errors.update(e)
        s, e = interleave(quiet, {"pool off": lambda: pool(False), "pool on": lambda: pool(True)},
                          reps=reps_pool, warmup=0, block=1)
        samples.update(s), errors.update(e)
        s, e = interleave(quiet, {"kill on": lambda: kill(True)}, reps=reps_kill, warmup=0, block=1)
        samples.update(s), errors.update(e)
        # Bulk deaths for the watcher's figures: forked children of this process, each sharing one array.
        deaths = 1 + len(samples.get("kill on", []))
        for i in range(bulk):
            before = set(os.listdir(SHM))
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(r)
                    keep = shmarray.share(f"shmbench-watch-bulk-{i}", np.ones(SMALL))  # noqa: F841
                    os.write(w, b"r")
                    time.sleep(60)
                finally:
                    os._exit(0)
            os.close(w)
            os.read(r, 1)
            os.close(r)
            new = set(os.listdir(SHM)) - before
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if _gone(new, time.perf_counter(), 5.0) is None:
                raise RuntimeError(f"bulk death {i}: its segment still there 5 s later")
            deaths += 1
        rss, cpu = _proc_figures(watcher)
        off_result["off_later_left"] = len(set(off_result["off_names"]) & set(os.listdir(SHM)))
        idle = None
        if not quick:
            time.sleep(0.2)
            _, c0 = _proc_figures(watcher)
            time.sleep(3.0)
            _, c1 = _proc_figures(watcher)
            idle = (c1 - c0) / 3.0 * 1e3
    finally:
        w_on.close()
        w_off.close()
        mine.close()

    def med(which: str, field: str) -> float:
        xs = [x[field] for x in pool_figures[which]]
        return statistics.median(xs) if xs else 0.0

    return {
        "samples": samples, "errors": errors, "pool_workers": pool_workers, "batch": batch,
        "watcher": {"rss0_kb": rss0, "cpu0_s": cpu0, "rss_kb": rss, "cpu_s": cpu, "deaths": deaths,
                    "idle_cpu_ms_per_s": idle},
        "pool": {w: {f: med(w, f) for f in ("processes", "watchers", "watcher_sockets", "worker_fds")}
                 for w in ("on", "off")},
        "pool_all": pool_figures, **off_result,
    }


if __name__ == "__main__":
    print(json.dumps(_measure(bool(int(sys.argv[1])))))
