"""BatchRing: slots, ordering, backpressure, shutdown, dead holders, corrupt control blocks."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
from _procs import run, start

import shmarray
from shmarray._npy import MAX_DIMS
from shmarray import (
    BatchRing,
    HeaderError,
    RingShutDownError,
    RingTimeoutError,
    ShmError,
    SlotLostError,
    SlotStateError,
    SlotToken,
)
from shmarray._header import HEADER, Kind, pack_header
from shmarray._ring.layout import CONTROL_WORDS, G_NEXT_DELIVER, LOST_LOG, SLOT_WORDS

FIELDS = {"images": ((4, 3, 8, 8), np.uint8), "labels": ((4,), np.int64)}
SLOT_TABLE = CONTROL_WORDS + LOST_LOG * 4
SPAWN = mp.get_context("spawn")


def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    """Poll *cond* until true, failing after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def fill(slot, value: int) -> None:
    slot["images"][:] = value % 256
    slot["labels"][:] = value


# -- children (module level: spawn imports them by name) --------------------------------------


def _produce(key: str, tag: int, n: int, pause: float) -> list[int]:
    tickets = []
    with BatchRing.attach(key) as ring:
        for i in range(n):
            with ring.acquire(10) as slot:
                fill(slot, tag * 1000 + i)
                tickets.append(slot.ticket)
            if pause:
                time.sleep(pause)
    return tickets


def _consume_all(key: str) -> list[int]:
    out = []
    with BatchRing.attach(key) as ring:
        for batch in ring.batches(timeout=10):
            out.append(int(batch["labels"][0]))
    return out


def _hold(key: str, role: str) -> None:
    ring = BatchRing.attach(key)
    slot = ring.acquire(10) if role == "producer" else ring.get(10)
    slot["labels"][:] = -1 if role == "producer" else slot["labels"]
    time.sleep(120)  # killed by the test


def _wait_blocked(key: str, role: str, ready) -> tuple[str, float]:
    ring = BatchRing.attach(key)
    t0 = time.monotonic()
    ready.set()
    try:
        if role == "producer":
            ring.acquire(None)
        elif role == "consumer":
            ring.get(None)
        else:
            return "iterated", float(sum(1 for _ in ring))
    except RingShutDownError:
        return "shut down", time.monotonic() - t0
    finally:
        ring.close()
    return "returned", time.monotonic() - t0


def _release_later(key: str, delay: float) -> int:
    with BatchRing.attach(key) as ring:
        batch = ring.get(10)
        time.sleep(delay)
        batch.release()
        return int(batch.ticket)


def _claim(key: str, token: SlotToken) -> int:
    with BatchRing.attach(key) as ring:
        with ring.claim(token) as batch:
            return int(batch["labels"][0])


def _publish_from_inherited(ring: BatchRing, value: int) -> int:
    with ring.acquire(5) as slot:
        fill(slot, value)
        return slot.ticket


def _hold_inherited(ring: BatchRing) -> None:
    ring.acquire(5)
    os.kill(os.getpid(), signal.SIGKILL)


def _attach_pickled(ring: BatchRing) -> tuple[int, list[str]]:
    return ring.slots, list(ring.fields)


# -- building --------------------------------------------------------------------------------


def test_create_attach_views_are_zero_copy(key):
    with BatchRing.create(key, FIELDS, slots=3) as ring, BatchRing.attach(key) as other:
        assert other.slots == 3 and other.ordered
        assert other.fields == {"images": ((4, 3, 8, 8), np.dtype(np.uint8)),
                                "labels": ((4,), np.dtype(np.int64))}
        with ring.acquire(0) as slot:
            assert slot["images"].shape == (4, 3, 8, 8) and slot["labels"].dtype == np.int64
            assert slot["images"].ctypes.data % 64 == 0 and slot["labels"].ctypes.data % 64 == 0
            fill(slot, 7)
        batch = other.get(0)
        assert int(batch["labels"][0]) == 7 and int(batch["images"][3, 2, 7, 7]) == 7
        batch["labels"][1] = 99  # the consumer's views are the same memory
        assert int(ring._slot_views(batch.index)["labels"][1]) == 99
        batch.release()


def test_structured_and_subarray_dtypes(key):
    rec = np.dtype([("x", "<f4"), ("name", "S3", (2,))])
    with BatchRing.create(key, {"r": (2, rec), "m": ((2,), ("<i4", (3,))), "s": ((), np.float64)}, 2) as ring:
        assert ring.fields["m"] == ((2, 3), np.dtype("<i4"))
        with ring.acquire(0) as slot:
            slot["r"]["x"] = [1.5, 2.5]
            slot["s"][()] = 3.25
        with BatchRing.attach(key) as other, other.get(0) as batch:
            assert batch["r"]["x"].tolist() == [1.5, 2.5] and float(batch["s"]) == 3.25


# NumPy 2's variable-width strings (np.dtypes appeared in 1.25, StringDType in 2.0).
_STRING_DTYPE = getattr(getattr(np, "dtypes", None), "StringDType", None)


@pytest.mark.parametrize("fields, slots, exc", [
    ({}, 2, TypeError),
    ([("a", ((2,), np.uint8))], 2, TypeError),
    ({"a": ((2,), object)}, 2, TypeError),
    ({"a": ((2,), np.dtype([("o", object)]))}, 2, TypeError),
    ({"a": ((-1,), np.uint8)}, 2, ValueError),
    ({"a": ((2.5,), np.uint8)}, 2, TypeError),
    ({"a": ((2,) * 65, np.uint8)}, 2, shmarray.InvalidSizeError),
    ({"a": ((2,) * 60, np.dtype(("u1", (2,) * 5)))}, 2, shmarray.InvalidSizeError),
    ({"a": ((2,), "not a dtype")}, 2, TypeError),
    ({"a": (2,)}, 2, TypeError),
    ({"": ((2,), np.uint8)}, 2, TypeError),
    ({"a": ((2,), np.uint8)}, 0, ValueError),
    ({"a": ((2,), np.uint8)}, 100000, ValueError),
    ({"a": ((2,), np.uint8)}, True, ValueError),
] + ([({"a": ((2,), _STRING_DTYPE())}, 2, TypeError)] if _STRING_DTYPE else []))
def test_bad_fields_refused_before_the_os(key, fields, slots, exc):
    with pytest.raises(exc):
        BatchRing.create(key, fields, slots)
    assert not shmarray.Segment(key).unlink()  # nothing was created


@pytest.mark.parametrize("shape, dtype", [((-1,), np.uint8), ((2,) * 65, np.uint8), ((2.5,), np.uint8),
                                          ((2,), object)] + ([((2,), _STRING_DTYPE())] if _STRING_DTYPE else []))
def test_fields_follow_the_array_rules(key, shape, dtype):
    """A ring field and an array are checked by one rule: the same error type, the same words."""
    with pytest.raises(Exception) as for_array:
        shmarray.create(key, shape, dtype)
    with pytest.raises(Exception) as for_ring:
        BatchRing.create(key, {"a": (shape, dtype)}, 2)
    assert type(for_ring.value) is type(for_array.value)
    assert str(for_ring.value).split(": ", 1)[1] == str(for_array.value).split(": ", 1)[1]
    assert not shmarray.Segment(key).unlink()


def test_a_field_of_many_dimensions_and_an_empty_dtype(key):
    deep = min(40, MAX_DIMS - 1)  # the batch dimension comes in front; NumPy 1.x allows 32 in all
    with BatchRing.create(key, {"deep": ((1,) * deep, np.int16), "none": ((3,), "S0")}, 2) as ring:
        with ring.acquire(0) as slot:
            slot["deep"][(0,) * deep] = 7
        with ring.get(0) as batch:
            assert batch["deep"].shape == (1,) * deep and int(batch["deep"].item()) == 7
            assert batch["none"].shape == (3,) and batch["none"].dtype == np.dtype("S0")


def test_bad_options(key):
    with pytest.raises(ValueError, match="on_lost"):
        BatchRing.create(key, FIELDS, 2, on_lost="ignore")
    with BatchRing.create(key, FIELDS, 2) as ring:
        with pytest.raises(TypeError, match="timeout"):
            ring.acquire("1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            ring.get(float("nan"))
        slot = ring.acquire(0)
        with pytest.raises(ValueError, match="rows"):
            slot.publish(rows=5)
        with pytest.raises(TypeError, match="rows"):
            slot.publish(rows=1.0)  # type: ignore[arg-type]
        slot.abort()


def test_pickles_by_key(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        assert run(_attach_pickled, ring) == (2, ["images", "labels"])


# -- the slot life cycle ---------------------------------------------------------------------


def test_slot_misuse_is_a_state_error(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        slot = ring.acquire(0)
        with pytest.raises(SlotStateError, match="for consumers"):
            slot.release()
        slot.publish()
        with pytest.raises(SlotStateError, match="not held"):
            slot.publish()
        batch = ring.get(0)
        with pytest.raises(SlotStateError, match="for producers"):
            batch.abort()
        batch.release()
        with pytest.raises(SlotStateError):
            batch.release()
        assert not batch.held and "done" in repr(batch)
    with pytest.raises(SlotStateError, match="closed"):
        ring.acquire(0)
    ring.close()  # idempotent


def test_context_manager_aborts_on_exception_and_ticket_is_skipped(key):
    with BatchRing.create(key, FIELDS, 3) as ring:
        with pytest.raises(ZeroDivisionError), ring.acquire(0) as slot:
            raise ZeroDivisionError
        assert not slot.held
        with ring.acquire(0) as slot:
            fill(slot, 5)
        with ring.get(0) as batch:  # ticket 0 was aborted: ticket 1 is next
            assert batch.ticket == 1 and int(batch["labels"][0]) == 5
        st = ring.stats()
        assert (st.aborted, st.published, st.delivered, st.free) == (1, 1, 1, 3)


def test_rows_limit_the_consumer_views(key):
    with BatchRing.create(key, {**FIELDS, "meta": ((), np.int32)}, 2) as ring:
        slot = ring.acquire(0)
        fill(slot, 3)
        slot.publish(rows=2)
        with ring.get(0) as batch:
            assert batch.rows == 2
            assert batch["images"].shape == (2, 3, 8, 8) and batch["labels"].shape == (2,)
            assert batch["meta"].shape == ()


def test_close_gives_held_slots_back(key):
    with BatchRing.create(key, FIELDS, 2, ordered=False) as ring:
        other = BatchRing.attach(key)
        other.acquire(0)
        with ring.acquire(0) as slot:
            fill(slot, 1)
        other.get(0)
        assert ring.stats().free == 0
        other.close()
        st = ring.stats()
        assert (st.free, st.aborted, st.lost, st.consumer_lost) == (2, 1, 0, 0)


# -- ordering ---------------------------------------------------------------------------------


def test_ordered_waits_for_the_oldest_ticket(key):
    with BatchRing.create(key, FIELDS, 3, ordered=True) as ring:
        a, b = ring.acquire(0), ring.acquire(0)
        fill(b, 1)
        b.publish()
        with pytest.raises(RingTimeoutError):
            ring.get(0.05)
        fill(a, 0)
        a.publish()
        assert [ring.get(0).ticket for _ in range(2)] == [0, 1]


def test_any_order_delivers_what_is_ready(key):
    with BatchRing.create(key, FIELDS, 3, ordered=False) as ring:
        a, b = ring.acquire(0), ring.acquire(0)
        b.publish()
        first = ring.get(0)
        assert first.ticket == 1
        a.publish()
        assert ring.get(0).ticket == 0


@pytest.mark.parametrize("ordered", [True, False])
def test_two_producer_processes_one_consumer(key, ordered):
    n = 12
    with BatchRing.create(key, FIELDS, 3, ordered=ordered) as ring:
        kids = [start(_produce, key, tag, n, 0.002 * tag) for tag in (1, 2)]
        got = []
        for _ in range(2 * n):
            with ring.get(10) as batch:
                got.append((batch.ticket, int(batch["labels"][0]), int(batch["images"][1, 2, 3, 4])))
        tickets = [kid.result(30) for kid in kids]
        assert sorted(t for ts in tickets for t in ts) == list(range(2 * n))
        values = [v for _, v, _ in got]
        assert sorted(values) == sorted(tag * 1000 + i for tag in (1, 2) for i in range(n))
        assert all(img == v % 256 for _, v, img in got)
        for tag in (1, 2):  # each producer's batches arrive in its own order
            mine = [v for v in values if v // 1000 == tag]
            assert mine == sorted(mine)
        if ordered:
            assert [t for t, _, _ in got] == list(range(2 * n))


# -- backpressure and timeouts ------------------------------------------------------------------


def test_backpressure_and_the_timeout_rule(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        for _ in range(2):
            ring.acquire(0).publish()
        t0 = time.monotonic()
        with pytest.raises(RingTimeoutError, match="free slot"):
            ring.acquire(0)
        assert time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        with pytest.raises(RingTimeoutError):
            ring.acquire(0.3)
        assert 0.3 <= time.monotonic() - t0 < 3
        # A consumer in another process frees a slot after 0.3 s: acquire(None) waits for it.
        kid = start(_release_later, key, 0.3)
        t0 = time.monotonic()
        slot = ring.acquire(None)
        assert time.monotonic() - t0 >= 0.2
        assert kid.result(10) == 0
        slot.abort()


def test_get_timeout_on_an_empty_ring(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        t0 = time.monotonic()
        with pytest.raises(RingTimeoutError, match="published batch"):
            ring.get(0.2)
        assert 0.2 <= time.monotonic() - t0 < 3
        with pytest.raises(TimeoutError):  # also the built-in
            ring.get(0)


# -- shutdown -------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["producer", "consumer", "iterator"])
def test_shutdown_wakes_waiters_in_other_processes(key, role):
    with BatchRing.create(key, FIELDS, 1) as ring:
        if role == "producer":
            ring.acquire(0).publish()  # full: the child waits for a slot
        ready = SPAWN.Event()
        kid = start(_wait_blocked, key, role, ready)
        assert ready.wait(20)
        time.sleep(0.2)  # let it block (the outcome is the same if it has not yet)
        t0 = time.monotonic()
        ring.shutdown()
        outcome, waited = kid.result(10)
        assert time.monotonic() - t0 < 5
        assert outcome == ("iterated" if role == "iterator" else "shut down")
        if role != "iterator":
            assert waited >= 0.15


def test_shutdown_drains_then_stops(key):
    with BatchRing.create(key, FIELDS, 3) as ring:
        ring.acquire(0).publish()
        filling = ring.acquire(0)
        ring.shutdown()
        assert ring.is_shut_down
        with pytest.raises(RingShutDownError):
            ring.acquire(0)
        assert ring.get(0).ticket == 0
        filling.publish()  # a slot being filled may still be published
        assert [b.ticket for b in ring] == [1]
        with pytest.raises(RingShutDownError, match="drained"):
            ring.get(0)


def test_shutdown_immediate_drops_batches(key):
    with BatchRing.create(key, FIELDS, 3) as ring:
        ring.acquire(0).publish()
        filling = ring.acquire(0)
        ring.shutdown(immediate=True)
        with pytest.raises(RingShutDownError):
            ring.get(0)
        with pytest.raises(RingShutDownError, match="dropped"):
            filling.publish()
        assert ring.stats().free == 3


# -- dead holders -----------------------------------------------------------------------------------


def test_producer_killed_while_filling_slot_comes_back_and_consumer_is_told(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        kid = start(_hold, key, "producer")
        wait_for(lambda: ring.stats().filling == 1, what="the child to hold a slot")
        with ring.acquire(0) as slot:  # ticket 1, behind the child's ticket 0
            fill(slot, 11)
        kid.kill()
        t0 = time.monotonic()
        with pytest.raises(SlotLostError) as info:
            ring.get(5)
        assert time.monotonic() - t0 < 1.0
        (lost,) = info.value.lost
        assert (lost.ticket, lost.pid) == (0, kid.pid)
        assert isinstance(info.value, ShmError)
        with ring.get(0) as batch:  # the ring goes on, in order
            assert batch.ticket == 1 and int(batch["labels"][0]) == 11
        st = ring.stats()
        assert (st.lost, st.free) == (1, 2)


def test_producer_killed_frees_a_slot_for_a_waiting_producer(key):
    with BatchRing.create(key, FIELDS, 1, on_lost="skip") as ring:
        kid = start(_hold, key, "producer")
        wait_for(lambda: ring.stats().filling == 1, what="the child to hold the only slot")
        with pytest.raises(RingTimeoutError):
            ring.acquire(0.1)
        kid.kill()
        t0 = time.monotonic()
        slot = ring.acquire(5)
        assert time.monotonic() - t0 < 1.0
        fill(slot, 4)
        slot.publish()
        with ring.get(0) as batch:  # on_lost="skip": no error, only the counter
            assert int(batch["labels"][0]) == 4
        assert ring.stats().lost == 1


def test_consumer_killed_while_reading(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        ring.acquire(0).publish()
        kid = start(_hold, key, "consumer")
        wait_for(lambda: ring.stats().reading == 1, what="the child to hold a batch")
        ring.acquire(0).publish()
        kid.kill()
        # Its slot comes back (the batch it was reading is dropped) ...
        t0 = time.monotonic()
        slot = ring.acquire(5)
        assert time.monotonic() - t0 < 1.0
        st = ring.stats()
        assert (st.consumer_lost, st.lost, st.delivered) == (1, 0, 1)
        slot.publish()
        # ... and with every consumer gone, a producer waiting on the full ring is told.
        with pytest.raises(RingShutDownError, match="every consumer has gone"):
            ring.acquire(5)


def test_forked_child_holds_slots_in_its_own_right(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        ring._new_epoch()  # warm: the lock and views exist before fork
        assert run(_publish_from_inherited, ring, 42, method="fork") == 0
        with ring.get(0) as batch:
            assert int(batch["labels"][0]) == 42
        with pytest.raises(RuntimeError):
            run(_hold_inherited, ring, method="fork")  # dies holding a slot
        with pytest.raises(SlotLostError):
            ring.get(5)
        assert ring.stats().free == 2


# -- hand-off tokens ----------------------------------------------------------------------------------


def test_handoff_and_claim_across_processes(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        slot = ring.acquire(0)
        fill(slot, 8)
        token = slot.handoff(rows=3)
        with pytest.raises(RingTimeoutError):
            ring.get(0)  # handed-off slots are not for get()
        assert run(_claim, key, token) == 8
        with pytest.raises(SlotLostError, match="stale"):
            ring.claim(token)  # claimed once already
        stale = ring.acquire(0).handoff()
        ring._new_epoch()
        with pytest.raises(SlotLostError, match="stale"):
            ring.claim(stale)
        with pytest.raises(TypeError):
            ring.claim((key, 0))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            ring.claim(SlotToken("other", 0, 1, 0, 0))
        assert ring.stats().free == 2


def test_ordered_get_skips_handed_off_tickets_at_once(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        for _ in range(500):
            ring.claim(ring.acquire(0).handoff()).release()
        ring.acquire(0).publish()
        with ring.get(0) as batch:
            assert batch.ticket == 500
        assert ring._ctl[G_NEXT_DELIVER] == 501  # jumped past the handed-off tickets at once


# -- corrupt or foreign segments -------------------------------------------------------------------------


def _attach_error(key: str) -> ShmError:
    with pytest.raises(ShmError) as info:
        BatchRing.attach(key)
    return info.value


def test_wrong_kind_and_raw_bytes(key, make_key):
    with shmarray.Segment(key).create(4096):
        assert "raw bytes" in str(_attach_error(key))
    other = make_key()
    with shmarray.Segment(other).create(4096) as seg:
        seg.data[: HEADER.size + 2] = pack_header(Kind.NDARRAY, b"{}", 128, 16)
        err = _attach_error(other)
        assert isinstance(err, HeaderError) and "ndarray" in str(err) and "shmarray.attach()" in str(err)


def _corrupt(key: str, edit) -> ShmError:
    with BatchRing.create(key, FIELDS, 2) as ring:
        seg = shmarray.Segment(key).attach()
        data = seg.data
        base = ring._base
        edit(data, base)
        err = _attach_error(key)
        seg.detach()
        return err


def _desc_span(data) -> tuple[int, int]:
    d_off, d_len = int.from_bytes(data[16:24], "little"), int.from_bytes(data[24:32], "little")
    return d_off, d_len


def _replace_desc(data, mutate) -> None:
    d_off, d_len = _desc_span(data)
    d = json.loads(bytes(data[d_off : d_off + d_len]))
    mutate(d)
    raw = json.dumps(d, separators=(",", ":")).encode()
    p_off = int.from_bytes(data[32:40], "little")
    assert d_off + len(raw) <= p_off
    data[d_off : d_off + len(raw)] = raw
    data[24:32] = len(raw).to_bytes(8, "little")


def _desc(mutate):
    return lambda data, base: _replace_desc(data, mutate)


def _word(index: int, value: int):
    def edit(data, base):
        data[base + 8 * index : base + 8 * index + 8] = value.to_bytes(8, "little")
    return edit


def _raw(start: int, raw: bytes):
    return lambda data, base: data.__setitem__(slice(start, start + len(raw)), raw)


@pytest.mark.parametrize("edit, match", [
    (_desc(lambda j: j["fields"][0].update(offset=64)), "do not match"),
    (_desc(lambda j: j["fields"][0].update(shape=[4, 3, 8, 80])), "corrupt descriptor"),
    (_desc(lambda j: j.update(slots=200)), "corrupt descriptor"),
    (_desc(lambda j: j["fields"][1].update(dtype="|O")), "invalid dtype|corrupt"),
    (_desc(lambda j: j.update(format="x")), "format"),
    (_raw(64, b"\xff\xfe"), "corrupt descriptor"),
    (_word(0, 0), "corrupt control block"),  # magic
    (_word(1, 3), "corrupt control block"),  # slot count
    (_word(SLOT_TABLE + SLOT_WORDS, 77), "state 77"),  # slot 1's state
])
def test_corrupt_rings_are_a_clean_error(key, edit, match):
    err = _corrupt(key, edit)
    assert isinstance(err, HeaderError)
    assert __import__("re").search(match, str(err)), str(err)


def test_state_corrupted_at_run_time(key):
    with BatchRing.create(key, FIELDS, 2) as ring:
        ring._ctl[SLOT_TABLE + SLOT_WORDS] = 9
        with pytest.raises(HeaderError, match="state 9"):
            ring.get(0)
        with pytest.raises(HeaderError, match="state 9"):
            ring.acquire(0) and ring.acquire(0)


def test_random_damage_never_crashes(key):
    rng = np.random.default_rng(1234)
    with BatchRing.create(key, FIELDS, 2) as ring:
        seg = shmarray.Segment(key).attach()
        data = np.frombuffer(seg.data, np.uint8)
        end = ring._base + ring._lay.control_bytes
        pristine = data[:end].copy()
        outcomes = {"ok": 0, "error": 0}
        for _ in range(300):
            data[:end] = pristine
            pos = rng.integers(0, end, size=rng.integers(1, 4))
            data[pos] = rng.integers(0, 256, size=pos.size)
            try:
                other = BatchRing.attach(key)
            except ShmError:
                outcomes["error"] += 1
                continue
            outcomes["ok"] += 1
            try:
                other.stats()
            except ShmError:
                pass
            other.close()
        data[:end] = pristine
        del data
        seg.detach()
        assert outcomes["error"] > 0 and outcomes["ok"] > 0


def test_ls_describes_the_ring(key):
    from shmarray._cli import describe_payload

    with BatchRing.create(key, FIELDS, 3, ordered=False):
        text = describe_payload(shmarray.segment_info(key))
        assert text.startswith("batch ring, 3 slots")
        assert "images" in text and "uint8 (4, 3, 8, 8)" in text and "int64 (4,)" in text


# -- waiting: the doorbell ---------------------------------------------------------------------------


def _sleepy_get(key: str, timeout: float) -> tuple[int, float]:
    """get() with the dead-holder scan pushed past the timeout: only the doorbell can end the wait early."""
    from shmarray._ring import ring as ring_module

    ring_module._SCAN_EVERY = 3600.0
    with BatchRing.attach(key) as ring:
        t0 = time.monotonic()
        with ring.get(timeout) as batch:
            return int(batch["labels"][0]), time.monotonic() - t0


def _sleepers(ring: BatchRing) -> int:
    from shmarray._ring.layout import G_SLEEPERS

    return int(ring._ctl[G_SLEEPERS])


def test_sleeping_consumers_are_woken_by_the_doorbell(key):
    with BatchRing.create(key, FIELDS, slots=4) as ring:
        assert ring._bell is not None  # futexes work here: the doorbell is in use
        children = [start(_sleepy_get, key, 20.0) for _ in range(2)]
        wait_for(lambda: _sleepers(ring) == 2, 30, "both consumers asleep on the doorbell")
        for value in (7, 8):
            with ring.acquire(5) as slot:
                fill(slot, value)
        got = sorted(c.result(30) for c in children)
        # Woken long before their 20 s timeouts; nothing else could wake them before it.
        assert [v for v, _ in got] == [7, 8] and all(t < 15 for _, t in got), got
        assert _sleepers(ring) == 0


def test_sleepers_are_counted_back_after_timeouts_and_close(key):
    with BatchRing.create(key, FIELDS, slots=2) as ring:
        for _ in range(3):
            with pytest.raises(RingTimeoutError):
                ring.get(0.08)
        assert _sleepers(ring) == 0
        other = BatchRing.attach(key)
        other._asleep = True  # as if a nap was interrupted (Ctrl-C) after being counted
        from shmarray._ring.layout import G_SLEEPERS

        ring._ctl[G_SLEEPERS] += 1
        other.close()
        assert _sleepers(ring) == 0


def test_without_a_doorbell_waiters_poll(key, monkeypatch):
    from shmarray._os import backend

    monkeypatch.setattr(backend, "doorbell", lambda *a, **k: None)
    with BatchRing.create(key, FIELDS, slots=2) as ring:
        assert ring._bell is None

        def later() -> None:
            time.sleep(0.1)
            with ring.acquire(5) as slot:
                fill(slot, 5)

        import threading

        t = threading.Thread(target=later)
        t.start()
        with ring.get(10) as batch:
            assert int(batch["labels"][0]) == 5
        t.join()
        assert _sleepers(ring) == 0
        with pytest.raises(RingTimeoutError):
            ring.get(0.05)


def test_the_os_doorbell():
    import mmap

    from shmarray._os import backend

    mm = mmap.mmap(-1, 4096)
    words = memoryview(mm).cast("Q")
    bell = backend.doorbell(words, 8)
    assert bell is not None
    t0 = time.monotonic()
    bell.wait(123, 5.0)  # the word holds 0, not 123: returns at once
    assert time.monotonic() - t0 < 2.5
    bell.ring()  # nobody asleep: a no-op
    assert backend.doorbell(memoryview(bytes(16)), 0) is None  # read-only: no futex, poll
    assert backend.doorbell(words, 2) is None  # not a 4-byte aligned word
    words.release()
    mm.close()  # the doorbell took no lasting export of the mapping
