"""torch DataLoader workers writing into a BatchRing (skipped without torch)."""

from __future__ import annotations

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
