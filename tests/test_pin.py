"""Segment.pin(): the CUDA-absent error for real, the bookkeeping through a recording runtime."""

from __future__ import annotations

import numpy as np
import pytest
from _procs import run

import shmarray
from shmarray import _cuda
from shmarray._cuda import CudaUnavailableError, PinError


def _cuda_here() -> bool:
    return _cuda.backend_name() is not None


class Recorder(_cuda._Runtime):
    """Stands in for the CUDA runtime: records calls, checks the range is mapped and whole."""

    name = "recorder"

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.fail = fail
        self.live: dict[int, int] = {}

    def register(self, ptr: int, size: int, flags: int) -> None:
        if self.fail:
            raise OSError("cudaHostRegister: invalid argument")
        assert ptr % 4096 == 0, "registration must start on a page"
        self.calls.append(("register", ptr, flags))
        self.live[ptr] = size

    def unregister(self, ptr: int) -> None:
        assert ptr in self.live, "unregister of a range never registered"
        del self.live[ptr]
        self.calls.append(("unregister", ptr, 0))


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(_cuda, "_found", rec)
    return rec


def _detach_in_fork(seg: shmarray.Segment) -> tuple[bool, int]:
    pinned = seg.is_pinned
    seg.detach()
    return pinned, len(_cuda._found.calls)  # type: ignore[union-attr]


# -- no CUDA: the real path -------------------------------------------------------------------


@pytest.mark.skipif(_cuda_here(), reason="CUDA is available: the error path cannot be reached")
def test_pin_without_cuda_raises_the_documented_error(key):
    with shmarray.Segment(key).create(8192) as seg:
        with pytest.raises(CudaUnavailableError) as info:
            seg.pin()
        err = info.value
        assert isinstance(err, shmarray.ShmError) and isinstance(err, RuntimeError)
        assert isinstance(err, PinError)
        assert key in str(err) and "torch" in str(err) and "cupy" in str(err) and "libcudart" in str(err)
        assert not seg.is_pinned and not seg.unpin()
        assert seg.error == shmarray.SharedMemoryError.UnknownError
    with pytest.raises(shmarray.NotFoundError, match="not attached"):
        seg.pin()


@pytest.mark.skipif(_cuda_here(), reason="CUDA is available: the error path cannot be reached")
def test_ring_pin_without_cuda(key):
    with shmarray.BatchRing.create(key, {"x": ((4,), np.float32)}, 2) as ring:
        with pytest.raises(CudaUnavailableError):
            ring.pin()
        assert not ring.is_pinned


# -- bookkeeping, through a recording runtime ------------------------------------------------------


def test_pin_registers_the_whole_mapping_once(key, recorder):
    with shmarray.Segment(key).create(3 * 4096 + 5) as seg:
        seg.pin()
        seg.pin()  # idempotent
        assert seg.is_pinned
        view = np.frombuffer(seg.data, np.uint8)
        assert recorder.calls == [("register", view.ctypes.data, _cuda._PORTABLE)]
        assert recorder.live[view.ctypes.data] == seg.size
        assert seg.unpin() and not seg.is_pinned and not seg.unpin()
        assert [c[0] for c in recorder.calls] == ["register", "unregister"]


def test_detach_unregisters_before_the_mapping_can_go(key, recorder):
    seg = shmarray.Segment(key).create(4096)
    seg.pin()
    region = seg._att.pinned  # type: ignore[union-attr]
    keep = np.frombuffer(seg.data, np.uint8)  # a live view: the mapping outlives the detach
    keep[:3] = 7
    seg.detach()
    assert [c[0] for c in recorder.calls] == ["register", "unregister"]
    assert region._view is None  # the region let go of the mapping only after unregistering
    assert keep[:3].tolist() == [7, 7, 7]


def test_read_only_attachment_registers_read_only(key, recorder):
    with shmarray.Segment(key).create(4096), shmarray.Segment(key).attach(shmarray.AccessMode.ReadOnly) as ro:
        ro.pin()
        assert recorder.calls[0][2] == _cuda._PORTABLE | _cuda._READ_ONLY


def test_registration_refused_is_a_pin_error(key, monkeypatch):
    monkeypatch.setattr(_cuda, "_found", Recorder(fail=True))
    with shmarray.Segment(key).create(4096) as seg:
        with pytest.raises(PinError, match="invalid argument") as info:
            seg.pin()
        assert not isinstance(info.value, CudaUnavailableError)
        assert not seg.is_pinned


def test_forked_child_never_unregisters_the_parents_pin(key, recorder):
    with shmarray.Segment(key).create(4096) as seg:
        seg.pin()
        assert run(_detach_in_fork, seg, method="fork") == (False, 1)
        assert seg.is_pinned and len(recorder.calls) == 1


def test_ring_pins_through_its_segment(key, recorder):
    with shmarray.BatchRing.create(key, {"x": ((4,), np.float32)}, 2) as ring:
        ring.pin()
        assert ring.is_pinned and ring.segment.is_pinned
    assert [c[0] for c in recorder.calls] == ["register", "unregister"]


# -- a real GPU ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not _cuda_here(), reason="needs CUDA")
def test_real_pin_makes_tensors_pinned(key):  # pragma: no cover - runs on GPU machines only
    torch = pytest.importorskip("torch")
    with shmarray.BatchRing.create(key, {"x": ((1024,), np.float32)}, 2) as ring:
        ring.pin()
        with ring.acquire(0) as slot:
            slot["x"][:] = 3
        with ring.get(0) as batch:
            t = torch.from_numpy(batch["x"])
            assert t.is_pinned()
            assert float(t.to("cuda", non_blocking=True).sum()) == 3 * 1024
            torch.cuda.synchronize()
