"""The batch ring: fixed-shape batch slots in one segment, from worker processes to a consumer.

- ``layout``: the ring's bytes (control words, slot words, the descriptor) and the
  byte-range lock offsets; no state, no I/O.
- ``slots``: what the ring hands out (Slot, SlotToken, RingStats, errors); it knows
  the ring only through a small protocol, so nothing here imports ``ring``.
- ``ring``: BatchRing, which owns every state change.
"""
