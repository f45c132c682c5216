"""wake: how soon a waiting process sees an event, and what waiting costs it while nothing happens.

One figure per method, the wake latency: a waiter process is told to wait,
the producer sleeps 6-12 ms (so the waiter is idle, as a consumer between
batches is), stamps the monotonic clock (system-wide) and makes the event;
the waiter stamps it when its wait returns. The sample is the difference.
Every method pays the same kernel wake-up of an idle process (100-200 us
here), which the floor row shows alone.

The cost of waiting: for each method the waiter then waits 1 s with no
event, and the group reports its voluntary context switches per second
(``/proc/PID/status``), i.e. how often waiting wakes the process up.

Methods:

- ``BatchRing.get()``: the producer ``acquire()``s a slot and ``publish()``es
  it; the consumer sleeps on the ring's doorbell (a futex on the ring's
  version word), waking every 20 ms to look for dead holders;
- the same with the doorbell off in the waiter (it polls: naps doubling
  from 50 us to 1 ms), the ring's wait before the doorbell;
- the doorbell alone: a word of a segment bumped and rung, the waiter asleep
  in ``Doorbell.wait`` (the ring's wait without the ring's Python work);
- ``posix_ipc.Semaphore``: the named-semaphore doorbell shmarray could have
  used instead (release / acquire with a timeout), to compare with the row above;
- ``multiprocessing.Queue``: put / get;
- floor: a blocking read on a ``multiprocessing.Pipe`` (the kernel's wake-up alone).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from .._harness import MP, Context, GroupResult, Row, Worker, have, inherited, interleave

NAME = "wake"
TITLE = "Wake-up: event to a waiting process (latency), and the idle waiter's wake-ups"

RING = "shmarray BatchRing get() (doorbell)"
RING_POLL = "shmarray BatchRing get(), doorbell off (polling)"
BELL = "shmarray doorbell alone (futex wait / ring on a segment word)"
SEM = "posix_ipc.Semaphore release / acquire"
QUEUE = "multiprocessing.Queue put / get"
FLOOR = "floor: blocking read on a multiprocessing.Pipe"

_FIELDS = {"x": ((8,), "<i8")}


def _switches(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


# -- the waiter's side (runs in a harness Worker; state lives here between calls) ----------------------

_W: dict[str, Any] = {}


def _open_waiter(kind: str, spec: dict[str, Any]) -> int:
    """Open what *kind* waits on; returns this process's pid."""
    _W.clear()
    _W["kind"] = kind
    if kind == BELL:
        import shmarray
        from shmarray._os import backend

        seg = shmarray.Segment(spec["key"]).attach()
        word = seg.data.cast("Q")
        _W.update(seg=seg, word=word, bell=backend.doorbell(word, 0))
    elif kind in (RING, RING_POLL):
        import shmarray
        from shmarray._os import backend

        if kind == RING_POLL:
            backend.doorbell = lambda *a, **k: None  # type: ignore[assignment]
        _W["ring"] = shmarray.BatchRing.attach(spec["key"])
    elif kind == SEM:
        import posix_ipc

        _W["sem"] = posix_ipc.Semaphore(spec["name"])
    return os.getpid()


def _wait_once(timeout: float) -> int:
    """Wait for one event; the monotonic time (ns) the wait returned."""
    kind = _W["kind"]
    if kind == BELL:
        word, bell = _W["word"], _W["bell"]
        seen = word[1]  # the producer's count of events so far, set before each wait
        deadline = time.monotonic() + timeout
        while word[0] == seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no event")
            bell.wait(seen, min(left, 0.02))
    elif kind in (RING, RING_POLL):
        with _W["ring"].get(timeout):
            pass
    elif kind == SEM:
        _W["sem"].acquire(timeout)
    elif kind == QUEUE:
        inherited("queue").get(timeout=timeout)
    else:
        pipe = inherited("pipe")
        if not pipe.poll(timeout):
            raise TimeoutError("no event")
        pipe.recv_bytes()
    return time.perf_counter_ns()


def _close_waiter() -> None:
    if "ring" in _W:
        _W["ring"].close()
    if "sem" in _W:
        _W["sem"].close()
    if "seg" in _W:
        _W["word"].release()
        _W["seg"].detach()
    _W.clear()


class _Method:
    """The producer's side of one method, with its waiter (a harness Worker)."""

    def __init__(self, ctx: Context, kind: str, producer: Any, spec: dict[str, Any]) -> None:
        self.kind = kind
        self.queue = MP.Queue() if kind == QUEUE else None
        self.pipe_r, self.pipe_w = MP.Pipe(duplex=False) if kind == FLOOR else (None, None)
        self.worker = Worker(queue=self.queue, pipe=self.pipe_r)
        self.pid = self.worker.call(_open_waiter, kind, spec, timeout=60)
        self.arm: Callable[[], None] = lambda: None
        self.fire = self._firing(producer)
        self.rounds = 0

    def _firing(self, producer: Any) -> Callable[[], None]:
        kind = self.kind
        if kind in (RING, RING_POLL):
            def fire() -> None:
                producer.acquire(0).publish()
            return fire
        if kind == BELL:
            from shmarray._os import backend

            word = producer.data.cast("Q")
            bell = backend.doorbell(word, 0)

            def ring() -> None:
                word[0] += 1
                bell.ring()
            self.arm = lambda: word.__setitem__(1, word[0])  # what the waiter compares against
            return ring
        if kind == SEM:
            return producer.release  # type: ignore[no-any-return]
        if kind == QUEUE:
            q = self.queue
            return lambda: q.put(1)  # type: ignore[union-attr]
        w = self.pipe_w
        return lambda: w.send_bytes(b"x")  # type: ignore[union-attr]

    def sample(self) -> float:
        """Seconds from the event to the waiter's wait returning."""
        self.arm()
        self.worker.send(_wait_once, 10.0)
        self.rounds += 1
        time.sleep(0.006 + (self.rounds % 7) * 0.001)
        t0 = time.perf_counter_ns()
        self.fire()
        return (int(self.worker.result(15)) - t0) / 1e9

    def idle_switches(self, seconds: float) -> int:
        """The waiter's voluntary context switches per second of waiting with no event (over *seconds*)."""
        self.arm()
        self.worker.send(_wait_once, 10.0)
        time.sleep(0.05)
        before = _switches(self.pid)
        time.sleep(seconds)
        after = _switches(self.pid)
        self.fire()
        self.worker.result(15)
        return round((after - before) / seconds)

    def close(self) -> None:
        try:
            self.worker.call(_close_waiter, timeout=10)
        except Exception:  # noqa: BLE001 - closing at the end of a benchmark
            pass
        self.worker.close()


def run(ctx: Context) -> GroupResult:
    """Measure the wake latency of each method, then each idle waiter's wake-ups per second."""
    import shmarray

    res = GroupResult(NAME, TITLE)
    cl = ctx.cleanup
    key = cl.name("wake")
    ring = shmarray.BatchRing.create(key, _FIELDS, slots=4)
    cl.add(f"ring {key}", ring.close)
    bkey = cl.name("bell")
    bseg = shmarray.Segment(bkey).create(4096)
    cl.add(f"segment {bkey}", bseg.detach)
    producers: dict[str, tuple[Any, dict[str, Any]]] = {RING: (ring, {"key": key}),
                                                         RING_POLL: (ring, {"key": key}),
                                                         BELL: (bseg, {"key": bkey})}
    if have("posix_ipc"):
        import posix_ipc

        name = "/" + cl.name("sem")
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0)
        cl.add(name, lambda: posix_ipc.unlink_semaphore(name))
        cl.add(f"{name} handle", sem.close)
        producers[SEM] = (sem, {"name": name})
    else:
        res.skipped.append(f"{SEM}: posix_ipc is not installed (pip install 'shmarray-zerocopy[bench]')")
    producers[QUEUE] = (None, {})
    producers[FLOOR] = (None, {})

    methods: dict[str, _Method] = {}
    try:
        for kind, (producer, spec) in producers.items():
            methods[kind] = _Method(ctx, kind, producer, spec)
        ctx.log(f"  latency: {len(methods)} methods")
        samples, errors = interleave(ctx, {k: m.sample for k, m in methods.items()},
                                     reps=ctx.reps(41, 7), warmup=2)
        idle_s = 0.5 if ctx.quick else 1.0
        ctx.log(f"  idle wake-ups: {idle_s} s each")
        idle = {}
        for kind, m in methods.items():
            if kind not in errors:
                try:
                    idle[kind] = m.idle_switches(idle_s)
                except Exception as e:  # noqa: BLE001 - reported
                    errors[kind] = f"{type(e).__name__}: {e}"
    finally:
        for m in methods.values():
            m.close()
    for kind in producers:
        role = "shmarray" if kind.startswith("shmarray") else "floor" if kind == FLOOR else "peer"
        res.rows.append(Row(kind, samples.get(kind, []), variant="wake latency", role=role,
                            error=errors.get(kind, ""), extra={"idle_wakeups_per_s": idle.get(kind)}))
    res.notes.append("Idle waiter's voluntary context switches per second, waiting with no event: "
                     + "; ".join(f"{k}: {v}" for k, v in idle.items()) + ".")
    res.notes.append("The ring's doorbell wakes every 20 ms on its own to look for slot holders that "
                     "died (a dead process rings nothing), hence its ~50 wake-ups a second.")
    ours, polled = res.median(RING, variant="wake latency"), res.median(RING_POLL, variant="wake latency")
    if ours and polled:
        res.headline("ring wake latency: polling (before the doorbell) / doorbell", polled / ours, "> 1",
                     polled / ours > 1, f"doorbell {ours * 1e6:.0f} us, polling {polled * 1e6:.0f} us; "
                     f"idle wake-ups/s {idle.get(RING)} vs {idle.get(RING_POLL)}")
    s, b = res.median(SEM, variant="wake latency"), res.median(BELL, variant="wake latency")
    if b and s:
        res.headline("doorbell alone (futex) / posix_ipc semaphore (the doorbell not chosen), wake latency",
                     b / s, "-", None, f"futex {b * 1e6:.0f} us, semaphore {s * 1e6:.0f} us")
    return res
