"""Memory kept for reuse: the one home of recycling, both sides of a hand-off.

- ``kept_files``, the producer's side: a creator keeps the files of the
  segments it destroyed (hidden, by a link of its own) and builds its next
  segments in them, so their pages need no allocation and zeroing on first
  touch.
- ``idle_maps``, the worker's side: a mapping whose last view went is kept
  idle for the next attach of the same file, so a warm hand-off maps nothing
  and faults no page.

``SHMARRAY_REUSE_BYTES`` caps what a process keeps; 0 turns reuse off.
"""
