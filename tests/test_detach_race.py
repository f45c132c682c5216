"""The last two users of a segment detaching at the same moment: the segment is destroyed, not orphaned.

Each sees the other's hold on the liveness byte when it checks whether it
is the last; without a second look after dropping its own hold, both leave
and the name stays in /dev/shm (dead, but listed until `shmarray gc`).
Workers of a pool that finish their last tasks together do exactly this.
"""

from __future__ import annotations

import numpy as np

import shmarray
from shmarray import Segment

from _procs import start

ROUNDS = 300


def _detach_in_step(prefix: str, rounds: int, go_key: str) -> int:
    """Attach segment i, say so, spin until the parent says go, detach: in step with the parent."""
    go = shmarray.attach(go_key)
    for i in range(rounds):
        seg = Segment(f"{prefix}-{i}").attach()
        go[1] = i + 1
        while go[0] <= i:
            pass
        seg.detach()
    go.close()
    return rounds


def test_simultaneous_last_detach_destroys_the_segment(make_key):
    prefix = make_key("race")
    go_key = make_key("go")
    go = shmarray.create(go_key, (2,), np.int64)
    segs = [Segment(f"{prefix}-{i}").create(4096) for i in range(ROUNDS)]
    child = start(_detach_in_step, prefix, ROUNDS, go_key)
    try:
        for i in range(ROUNDS):
            while go[1] <= i:
                pass
            go[0] = i + 1  # both detach now, within a microsecond or so of each other
            segs[i].detach()
        assert child.result(60) == ROUNDS
    finally:
        child.close()
        left = [e.key for e in shmarray.ls(f"{prefix}-*")]
        for key in left:
            shmarray.unlink(key)
        go.close()
    assert left == [], f"{len(left)} of {ROUNDS} segments orphaned in /dev/shm"
