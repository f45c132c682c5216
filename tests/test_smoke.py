import shmarray
from _procs import run


def _read(key: str) -> bytes:
    with shmarray.Segment(key).attach(shmarray.AccessMode.ReadOnly) as seg:
        return bytes(seg.data[:5])


def test_two_processes_see_writes(key):
    with shmarray.Segment(key).create(4096) as seg:
        seg.data[:5] = b"hello"
        assert run(_read, key) == b"hello"
