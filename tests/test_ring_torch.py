"""torch DataLoader workers writing into a BatchRing (skipped without torch)."""

from __future__ import annotations

import collections
import gc
import mmap
import os
import pickle
import signal

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import shmarray  # noqa: E402
from shmarray import BatchRing, RingCollate, RingLoader, SlotToken, fill_slot, ring_loader  # noqa: E402

SAMPLE = {"images": ((3, 4, 4), np.uint8), "labels": ((), np.int64)}


class Samples(Dataset):
    """Sample i: images filled with i % 256, label i."""

    def __init__(self, n: int, kind: str = "dict") -> None:
        self.n = n
        self.kind = kind

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = np.full((3, 4, 4), i % 256, np.uint8)
        if self.kind == "tuple":
            return torch.from_numpy(img), i
        return {"images": img, "labels": i}


def _die_while_filling(slot, samples):
    """A fill that kills its worker while the worker holds the slot."""
    if any(s["labels"] == 6 for s in samples):
        os.kill(os.getpid(), signal.SIGKILL)
    return fill_slot(slot, samples)


def _check_batch(batch, expect_labels) -> None:
    labels = batch["labels"]
    assert isinstance(labels, torch.Tensor) and labels.tolist() == expect_labels
    assert batch["images"].shape == (len(expect_labels), 3, 4, 4)
    assert (batch["images"][:, 1, 2, 3] == labels.to(torch.uint8)).all()


@pytest.mark.timeout(120)
def test_spawn_workers_in_order_with_a_partial_last_batch():
    n, bs = 23, 5
    with ring_loader(Samples(n), SAMPLE, bs, num_workers=2, multiprocessing_context="spawn") as rl:
        assert len(rl) == 5 and rl.ring.slots == 6
        seen = 0
        for k, batch in enumerate(rl):
            _check_batch(batch, list(range(k * bs, min(n, (k + 1) * bs))))
            seen += len(batch["labels"])
            st = rl.ring.stats()
            # this batch, and the one before while the loop variable still held it when
            # this one was asked for; older ones went back when we moved on
            assert 1 <= st.reading <= 2
        assert seen == n
        st = rl.ring.stats()
        # the last batch (still in `batch`) keeps its slot until the next epoch or close()
        assert (st.free, st.reading, st.delivered, st.lost) == (5, 1, 5, 0)



@pytest.mark.timeout(120)
def test_tensors_are_views_of_the_slot_and_epochs_repeat():
    with ring_loader(Samples(12), SAMPLE, 4, num_workers=2, persistent_workers=True,
                     multiprocessing_context="fork") as rl:
        for _ in range(2):
            labels = []
            for batch in rl:
                # a view of the consumer's window of the slot: no copy was made
                ptr = batch["images"].data_ptr()
                windows = [np.frombuffer(m, np.uint8).ctypes.data for m in rl._windows.maps if m is not None]
                assert ptr in windows
                labels += batch["labels"].tolist()
            assert labels == list(range(12))
        # the last batch (still in `batch`) keeps its slot; nothing was copied on the way
        assert rl.ring.stats().free == rl.ring.slots - 1 and rl._windows.moved == 0


@pytest.mark.timeout(120)
def test_breaking_out_gives_every_slot_back():
    with ring_loader(Samples(200), SAMPLE, 4, num_workers=2, multiprocessing_context="fork") as rl:
        for k, batch in enumerate(rl):
            assert batch["labels"][0] == 4 * k
            if k == 3:
                break
        # every slot is back but the one of the batch in hand, which stays valid
        st = rl.ring.stats()
        assert (st.free, st.reading, st.handed_off, st.filling) == (rl.ring.slots - 1, 1, 0, 0)
        assert batch["labels"].tolist() == [12, 13, 14, 15]
        # the next epoch starts cleanly, and a peeked batch stays valid until the next one
        first = next(iter(rl))
        assert rl.ring.stats().reading == 1
        assert first["labels"].tolist() == [0, 1, 2, 3]
    assert rl.ring.closed


def test_main_process_loading_tuple_samples(key):
    fields = {"images": ((4, 3, 4, 4), np.uint8), "labels": ((4,), np.int64)}
    with BatchRing.create(key, fields, 1) as ring:
        loader = DataLoader(Samples(10, "tuple"), batch_size=4, collate_fn=RingCollate(ring))
        got = [batch["labels"].tolist() for batch in RingLoader(loader, ring)]
        assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert ring.stats().free == 1


def test_custom_fill_and_fields_torch_cannot_hold(key):
    rec = np.dtype([("a", "<i4"), ("b", "S2")])
    fields = {"recs": ((2,), rec), "labels": ((2,), np.int64)}

    def fill(slot, samples):
        for i, s in enumerate(samples):
            slot["recs"][i] = (s, b"ok")
            slot["labels"][i] = s * 10
        return len(samples)

    with BatchRing.create(key, fields, 2) as ring:
        loader = DataLoader(list(range(3)), batch_size=2, collate_fn=RingCollate(ring, fill=fill))
        batches = list(RingLoader(loader, ring))
        assert isinstance(batches[0]["recs"], np.ndarray)  # structured: stays an ndarray
        assert batches[1]["labels"].tolist() == [20]


def test_bad_setups_are_refused(key):
    fields = {"x": ((4,), np.int64)}
    with BatchRing.create(key, fields, 3) as ring:
        loader = DataLoader(list(range(8)), batch_size=4, num_workers=2, collate_fn=RingCollate(ring))
        with pytest.raises(ValueError, match="at least 4 slots"):
            RingLoader(loader, ring)
        with pytest.raises(ValueError, match="collate_fn"):
            RingLoader(DataLoader(list(range(8)), batch_size=4), ring)
        with pytest.raises(ValueError, match="does not fit"):
            list(RingLoader(DataLoader(list(range(8)), batch_size=5, collate_fn=RingCollate(ring)), ring))
        with pytest.raises(KeyError, match="no field 'x'"):
            list(RingLoader(DataLoader([{"y": 1}], batch_size=1, collate_fn=RingCollate(ring)), ring))
        with pytest.raises(TypeError, match="same_kind|Cannot cast"):
            list(RingLoader(DataLoader([0.5], batch_size=1, collate_fn=RingCollate(ring)), ring))
        assert ring.stats().free == 3  # every failed collate aborted its slot
    with pytest.raises(TypeError, match="sets collate_fn"):
        ring_loader(Samples(4), SAMPLE, 2, collate_fn=None)
    with pytest.raises(ValueError, match="batch_size"):
        ring_loader(Samples(4), SAMPLE, 0)


def test_collate_pickles_by_key(key):
    with BatchRing.create(key, {"x": ((2,), np.int64)}, 2) as ring:
        collate = pickle.loads(pickle.dumps(RingCollate(ring, timeout=1.0)))
        assert collate.key == key and collate.timeout == 1.0
        token = collate([1, 2])
        assert isinstance(token, SlotToken)
        with ring.claim(token) as batch:
            assert batch["x"].tolist() == [1, 2]
        collate.ring().close()


@pytest.mark.timeout(120)
def test_worker_killed_while_holding_a_slot():
    with ring_loader(Samples(40), SAMPLE, 2, num_workers=2, multiprocessing_context="fork",
                     fill=_die_while_filling) as rl:
        with pytest.raises(RuntimeError, match="exited unexpectedly|killed"):
            for _ in rl:
                pass
        st = rl.ring.stats()
        # the slot came back, the loss is counted (the last batch, still in `_`, keeps its slot)
        assert st.lost == 1 and st.reading <= 1 and st.free == rl.ring.slots - st.reading


def test_pin_without_cuda_is_the_documented_error():
    if torch.cuda.is_available():  # pragma: no cover - GPU machines run tests/test_pin.py's real path
        pytest.skip("CUDA is available here")
    with pytest.raises(shmarray.CudaUnavailableError):
        ring_loader(Samples(4), SAMPLE, 2, num_workers=0, pin=True)


# -- batches that are kept, inferred fields, default_collate's structure --------------------------------

Pair = collections.namedtuple("Pair", "image label")


class Shaped(Dataset):
    """Sample i in one of the structures default_collate knows, every value derived from i."""

    def __init__(self, n: int, kind: str) -> None:
        self.n = n
        self.kind = kind

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = np.full((3, 4, 4), i % 256, np.uint8)
        if self.kind == "tuple":
            return torch.from_numpy(img), i
        if self.kind == "list":
            return [img, float(i) / 2, np.float32(i)]
        if self.kind == "dict":
            return {"images": img, "labels": i, "ok": i % 2 == 0}
        if self.kind == "namedtuple":
            return Pair(img, np.int16(i))
        if self.kind == "single":
            return np.arange(5, dtype=np.int32) + i
        assert self.kind == "nested"
        return {"x": (img, {"m": np.full((2,), i, np.float64)}), "y": [i, (np.uint8(i % 7),)]}


def _same(got, want, where="batch") -> None:
    """*got* is what default_collate gives (*want*): same types, structure, dtypes and values."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            _same(got[k], want[k], f"{where}[{k!r}]")
    else:
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")


def _expected(ds, batch_size):
    return list(DataLoader(ds, batch_size=batch_size))  # default_collate, in this process


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "namedtuple", "single", "nested"])
def test_inferred_fields_give_default_collates_structure(kind):
    ds = Shaped(21, kind)
    with ring_loader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork") as rl:
        got = list(rl)  # every batch kept, 6 batches through 6 slots
        assert len(got) == 6
        for g, w in zip(got, _expected(ds, 4)):
            _same(g, w)
    for g, w in zip(got, _expected(ds, 4)):  # the loader is closed: kept batches keep their data
        _same(g, w)


@pytest.mark.timeout(120)
def test_tuple_samples_unpack_as_with_a_dataloader_in_spawned_workers():
    ds = Shaped(40, "namedtuple")
    with ring_loader(ds, batch_size=8, num_workers=2, multiprocessing_context="spawn") as rl:
        seen = 0
        for images, labels in rl:  # a namedtuple of tensors, as default_collate gives
            assert images.shape[1:] == (3, 4, 4) and labels.dtype == torch.int16
            assert (images[:, 0, 0, 0] == labels.to(torch.uint8)).all()
            seen += len(labels)
        assert seen == 40


@pytest.mark.timeout(120)
def test_list_of_three_times_more_batches_than_slots_is_right_element_by_element():
    ds = Shaped(8 * 18 + 3, "tuple")
    with ring_loader(ds, batch_size=8, num_workers=2, multiprocessing_context="fork") as rl:
        assert rl.ring.slots == 6
        kept = list(rl)
        assert len(kept) == 19  # 3x the slots, and a partial batch
        want = _expected(ds, 8)
        for g, w in zip(kept, want):
            _same(g, w)
        assert rl._windows.moved >= 19 - rl.ring.slots  # the kept batches were moved out of the ring
        # the slots are all back but the last batch's, which is still in `kept`
        st = rl.ring.stats()
        assert st.free + st.reading == rl.ring.slots and st.reading <= 1
        # a second epoch refills every slot: the first epoch's batches do not change
        again = [labels.clone() for _, labels in rl]
        assert [w[1].tolist() for w in want] == [t.tolist() for t in again]
        for g, w in zip(kept, want):
            _same(g, w)


@pytest.mark.timeout(120)
def test_a_batch_held_across_an_epoch_boundary():
    ds = Shaped(48, "dict")
    with ring_loader(ds, batch_size=8, num_workers=2, persistent_workers=True,
                     multiprocessing_context="fork") as rl:
        for batch in rl:
            pass
        last = batch  # the last batch of epoch 1, and a view of it
        view = last["images"][2:]
        want = _expected(ds, 8)[-1]
        for _ in range(2):
            assert [b["labels"].tolist() for b in rl] == [w["labels"].tolist() for w in _expected(ds, 8)]
        _same(last, want)
        assert torch.equal(view, want["images"][2:])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("own_ring", [False, True])
def test_holding_every_slot_while_asking_for_the_next_batch(key, own_ring):
    ds = Shaped(80, "tuple")
    if own_ring:  # exactly the slots the DataLoader keeps in flight: none to spare for the consumer
        fields = {"[0]": ((4, 3, 4, 4), np.uint8), "[1]": ((4,), np.int64)}
        ring = BatchRing.create(key, fields, 4, slot_align=mmap.PAGESIZE)  # so that batches are windows
        loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork",
                            collate_fn=RingCollate(ring))
        rl = RingLoader(loader, ring)
        assert rl._keep == 0 and rl._windows.usable
    else:
        rl = ring_loader(ds, batch_size=4, num_workers=2, slots=5, multiprocessing_context="fork")
    try:
        held = []
        for batch in rl:  # 20 batches, every one kept
            held.append(batch)
            assert rl.ring.stats().reading <= 2
        want = _expected(ds, 4)
        assert len(held) == 20 and rl._windows.moved >= 19
        for g, w in zip(held, want):
            if own_ring:  # RingLoader over a collate without a schema: {field: tensor}
                g = (g["[0]"], g["[1]"])
            _same(list(g), w)
    finally:
        rl.close()
        if own_ring:
            ring.close()


def _ahead(loader, n):
    """A prefetching wrapper: it holds *n* batches before handing out the first."""
    queue = collections.deque()
    for batch in loader:
        queue.append(batch)
        if len(queue) > n:
            yield queue.popleft()
    yield from queue


@pytest.mark.timeout(120)
def test_a_prefetching_wrapper_holding_two_batches_ahead():
    ds = Shaped(96, "tuple")
    with ring_loader(ds, batch_size=8, num_workers=2, multiprocessing_context="fork") as rl:
        want = _expected(ds, 8)
        got = 0
        for (images, labels), w in zip(_ahead(rl, 2), want):
            _same([images, labels], w)
            got += 1
        assert got == 12


@pytest.mark.timeout(60)
def test_kept_batches_leave_no_descriptor_or_mapping_behind():
    ds = Shaped(8 * 40, "tuple")
    with ring_loader(ds, batch_size=8, num_workers=0) as rl:
        st = os.fstat(rl.ring.segment._lock_fd())
        dev, ino = st.st_dev, st.st_ino
        kept = list(rl)
        assert len(kept) == 40 and rl._windows.moved >= 38
        # the ring's own views of its slots (the segment's mapping) still see the shared bytes
        with rl.ring.acquire(0) as slot:
            slot["[0]"][:] = 77
            index = slot.index
        assert (rl.ring._slot_views(index)["[0]"] == 77).all()
        rl.ring._new_epoch()
    for g, w in zip(kept, _expected(ds, 8)):
        _same(g, w)
    del kept, g, slot  # (slot: its views keep the segment's own mapping and descriptor)
    gc.collect()
    with open("/proc/self/maps") as f:
        # every window (a mapping at a slot's offset) was unmapped; the segment's own
        # mapping, at offset 0, may stay idle for reuse (_reuse.idle_maps)
        assert not [line for line in f if f" {ino} " in line and int(line.split()[2], 16) != 0]
    assert (dev, ino) not in _inodes_open()  # and the windows' descriptor was closed


def _inodes_open() -> set[tuple[int, int]]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
            out.add((st.st_dev, st.st_ino))
        except OSError:  # the listing's own descriptor
            pass
    return out


def _run_to_end(loader):
    for _ in loader:
        pass


@pytest.mark.timeout(120)
def test_samples_that_do_not_fit_name_the_field_and_both_shapes():
    class Odd(Shaped):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            if i == 5 and self.kind == "dict":
                s["images"] = np.zeros((3, 4, 5), np.uint8)
            if i == 6 and self.kind == "tuple":
                s = (s[0], 0.5)
            if i == 7 and self.kind == "nested":
                del s["x"][1]["m"]
            return s

    with ring_loader(Odd(12, "dict"), batch_size=4, num_workers=0) as rl:
        message = r"sample 1: field 'images' is uint8 \(3, 4, 5\), expected uint8 \(3, 4, 4\) \(fields inferred"
        with pytest.raises(ValueError, match=message):
            _run_to_end(rl)
        assert rl.ring.stats().filling == 0  # the failed batch's slot was given back
    with (ring_loader(Odd(12, "tuple"), batch_size=4, num_workers=0) as rl,
          pytest.raises(ValueError, match=r"field '\[1\]' is float64 \(\), expected int64 \(\)")):
        _run_to_end(rl)
    with (ring_loader(Odd(12, "nested"), batch_size=4, num_workers=0) as rl,
          pytest.raises(KeyError, match=r"sample 3 at 'x\[1\]' has no field 'm'")):
        _run_to_end(rl)
    # in a worker process, the DataLoader re-raises the same error with the same message
    with (ring_loader(Odd(12, "dict"), batch_size=4, num_workers=2, multiprocessing_context="fork") as rl,
          pytest.raises(ValueError, match=r"field 'images' is uint8 \(3, 4, 5\), expected uint8 \(3, 4, 4\)")):
        _run_to_end(rl)
    # what a ring cannot hold is refused at construction, naming the field
    with pytest.raises(TypeError, match="field 'name' is a str"):
        ring_loader([{"name": "a", "x": 1}], num_workers=0)
    with pytest.raises(TypeError, match="pass the batch size by keyword: batch_size=4"):
        ring_loader(Shaped(8, "tuple"), 4)


@pytest.mark.timeout(60)
def test_explicit_fields_in_another_order_name_the_field():
    fields = {"labels": ((), np.int64), "images": ((3, 4, 4), np.uint8)}  # the samples are (image, label)
    with (ring_loader(Shaped(8, "tuple"), fields, 4, num_workers=0) as rl,
          pytest.raises(ValueError, match=r"field 'labels' is uint8 \(3, 4, 4\), expected int64 \(\)")):
        _run_to_end(rl)
    # the explicit form keeps working, and its batches mirror the samples too
    fields = {"images": ((3, 4, 4), np.uint8), "labels": ((), np.int64)}
    with ring_loader(Shaped(8, "tuple"), fields, 4, num_workers=0) as rl:
        for g, w in zip(rl, _expected(Shaped(8, "tuple"), 4)):
            _same(g, w)
    # and fill_slot (RingCollate's default) says the same for a ring of your own
    with pytest.raises(ValueError, match=r"field 'labels' is uint8 \(3, 4, 4\), the ring's field is int64 \(\)"):
        fill_slot(_FakeSlot({"labels": np.zeros(2, np.int64), "images": np.zeros((2, 3, 4, 4), np.uint8)}),
                  [Shaped(1, "tuple")[0]])


class _FakeSlot(dict):
    pass


@pytest.mark.timeout(60)
def test_batch_size_defaults_to_one_and_device_cpu_keeps_its_meaning():
    with ring_loader(Shaped(5, "tuple"), num_workers=0, device="cpu") as rl:
        got = list(rl)
        assert len(got) == 5 and got[0][0].shape == (1, 3, 4, 4)
        for g, w in zip(got, _expected(Shaped(5, "tuple"), 1)):
            _same(g, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(120)
def test_pinned_loader_keeps_batches_and_copies_to_the_gpu():  # pragma: no cover - GPU machines only
    ds = Shaped(8 * 20, "tuple")
    want = _expected(ds, 8)
    with ring_loader(ds, batch_size=8, num_workers=2, pin=True, multiprocessing_context="fork") as rl:
        kept = []
        for images, labels in rl:
            assert images.is_pinned()
            kept.append((images, labels))
        for g, w in zip(kept, want):
            _same(list(g), w)
    with ring_loader(ds, batch_size=8, num_workers=2, pin=True, device="cuda",
                     multiprocessing_context="fork") as rl:
        got = [(i.cpu(), l.cpu()) for i, l in rl]
        assert all(len(g) == 2 for g in got)
        for g, w in zip(got, want):
            _same(list(g), w)
