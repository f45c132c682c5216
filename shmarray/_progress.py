"""Progress bars for the writes a person waits for (share, create with a fill, share_table).

Only on request (``progress=True``): without it nothing here runs and tqdm is
never imported. The bar is ``tqdm.auto``'s, so it is a widget in Jupyter
(with ipywidgets; tqdm falls back to text and says so without them) and a
text bar on stderr in a terminal. tqdm is optional: ``pip install
'shmarray-zerocopy[progress]'``.

The bar advances inside ``Segment._create``'s ``write(data, offset)``: a
write larger than CHUNK is split into CHUNK-sized pwrites, with an update
after each, so one multi-GiB pwrite still moves the bar.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator

__all__ = ["CHUNK", "check_progress", "reporting", "label"]

Write = Callable[[memoryview, int], None]

# One bar update per 64 MiB: tens of ms of writing into fresh shared memory
# (pwrite's GB/s: the writes group; benchmarks/results/notes.md), so the bar
# moves smoothly and the extra updates cost nothing measurable (progress group).
CHUNK = 64 << 20


def check_progress(progress: object, what: str) -> bool:
    """Validate *progress*; when True, make sure tqdm can be imported (before the OS is touched)."""
    if not isinstance(progress, bool):
        raise TypeError(f"{what}: progress must be True or False, not {progress!r}")
    if progress:
        try:
            import tqdm.auto  # noqa: F401
        except ImportError as e:
            raise ModuleNotFoundError(
                f"{what}: progress=True needs tqdm, which is not installed; "
                "pip install '.[progress]' from a checkout (or pip install tqdm), or leave progress off",
                name="tqdm") from e
    return progress


def _bytes(data: memoryview) -> memoryview:
    """*data* as a flat view of bytes, so it can be cut at byte offsets."""
    return data if data.ndim == 1 and data.itemsize == 1 else data.cast("B")


def reporting(write: Write, total: int, desc: str, enabled: bool) -> ContextManager[Write]:
    """*write* as is, or (when *enabled*) a write that moves a bar of *total* bytes labelled *desc*.

    Use as ``with reporting(...) as w:``. The bar closes when the block ends;
    after an error it stays where the write stopped (tqdm shows it
    unfinished). Disabled, this is a ``nullcontext``: the default path pays
    well under a microsecond.
    """
    if not enabled:
        return nullcontext(write)
    return _bar(write, total, desc)


@contextmanager
def _bar(write: Write, total: int, desc: str) -> Iterator[Write]:
    from tqdm.auto import tqdm

    bar: Any = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True)

    def chunked(data: memoryview, offset: int) -> None:
        n = data.nbytes
        if n <= CHUNK:
            write(data, offset)
            bar.update(n)
            return
        flat = _bytes(data)
        for start in range(0, n, CHUNK):
            piece = flat[start : start + CHUNK]
            write(piece, offset + start)
            bar.update(piece.nbytes)

    try:
        yield chunked
    finally:
        bar.close()


def label(what: str, key: str) -> str:
    """A short bar label: the verb and the key, cut to fit a line."""
    text = f"{what} {key!r}"
    return text if len(text) <= 40 else text[:37] + "..."
