"""Arrow tables between processes: shmarray's share_table/attach_table against its peers.

Run ``python -m benchmarks.bench_arrow [--rows N] [--repeats R]``. Every
function below is importable and returns plain samples (seconds), so the
unified harness can call them; ``main`` prints medians and ratios from one run.

Measured (all on the same table, in the same run, methods interleaved):

handoff_samples
    end to end, from a table in this process to a Table usable in a warm,
    waiting process (it answers the row count): shmarray (default and
    ``validate="metadata"``), pickling through ``multiprocessing.Pipe``, the
    IPC stream written through an mmap into a stdlib ``SharedMemory`` and
    read zero-copy, and Feather written to /dev/shm and opened with
    ``pa.memory_map``.
attach_samples
    ``attach_table`` alone, in this process, for several row counts and
    each validation level (the segment is held by its creator meanwhile).
share_samples
    ``share_table`` alone against writing the same IPC stream to a /dev/shm
    file with plain writes (``pa.OSFile``).
write_path_samples
    the two ways to put an IPC stream into fresh shared memory: pwrite
    through the fd (what share_table does) and memcpy through a fresh
    mapping (``pa.FixedSizeBufferWriter``).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import secrets
import statistics
import time
from typing import Any, Callable

__all__ = [
    "make_table",
    "handoff_samples",
    "attach_samples",
    "share_samples",
    "write_path_samples",
    "main",
]

SHM = "/dev/shm"


def make_table(rows: int = 5_000_000) -> Any:
    """int64, float64, string (8-9 characters) and bool columns: ~130 MB at 5 M rows."""
    import numpy as np
    import pyarrow as pa

    idx = np.arange(rows, dtype=np.int64)
    words = pa.array([f"sym-{i:05d}" for i in range(4096)])
    return pa.table({"i": pa.array(idx), "f": pa.array(idx * 0.5), "s": words.take(pa.array(idx % 4096)),
                     "b": pa.array(idx % 3 == 0)})


def _name(tag: str) -> str:
    return f"bench-arrow-{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _stream_size(table: Any) -> int:
    import pyarrow as pa

    mock = pa.MockOutputStream()
    with pa.ipc.new_stream(mock, table.schema) as w:
        w.write_table(table)
    return int(mock.size())


# -- the waiting process ----------------------------------------------------------------


def _serve(conn: Any) -> None:
    """A warm consumer: for each request, get the table the requested way and answer its row count."""
    import pyarrow as pa
    from multiprocessing import shared_memory

    import shmarray

    while True:
        msg = conn.recv()
        if msg is None:
            return
        how, arg = msg
        if how == "ping":
            conn.send("pong")
            continue
        if how == "pickle":
            t = arg
            conn.send(t.num_rows)
        elif how == "shmarray":
            key, validate = arg
            t = shmarray.attach_table(key, validate=validate)
            conn.send(t.num_rows)
        elif how == "stdlib":
            # A spawned child shares its parent's resource tracker, which
            # forgets the name when the producer unlinks it.
            shm = shared_memory.SharedMemory(arg)
            t = pa.ipc.open_stream(pa.py_buffer(shm.buf)).read_all()
            conn.send(t.num_rows)
            del t
            gc.collect()
            shm.close()
        elif how == "feather":
            with pa.memory_map(arg, "r") as src:
                t = pa.ipc.open_file(src).read_all()
                conn.send(t.num_rows)
                del t
        else:  # pragma: no cover
            conn.send(f"unknown request {how!r}")
        t = None
        gc.collect()


class _Consumer:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.ask("ping", None)

    def ask(self, how: str, arg: Any) -> Any:
        self.conn.send((how, arg))
        if not self.conn.poll(120):
            raise TimeoutError(f"the consumer gave no answer to {how!r}")
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send(None)
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()


# -- one sample of each handoff -------------------------------------------------------------


def _h_shmarray(c: _Consumer, table: Any, validate: str) -> float:
    import shmarray

    key = _name("t")
    try:
        t0 = time.perf_counter()
        mine = shmarray.share_table(key, table)
        rows = c.ask("shmarray", (key, validate))
        t1 = time.perf_counter()
        del mine
    finally:
        gc.collect()
        try:
            shmarray.unlink(key)
        except shmarray.NotFoundError:
            pass
    _same(rows, table)
    return t1 - t0


def _h_pickle(c: _Consumer, table: Any) -> float:
    t0 = time.perf_counter()
    rows = c.ask("pickle", table)
    t1 = time.perf_counter()
    _same(rows, table)
    return t1 - t0


def _h_stdlib(c: _Consumer, table: Any) -> float:
    import pyarrow as pa
    from multiprocessing import shared_memory

    t0 = time.perf_counter()
    size = _stream_size(table)
    shm = shared_memory.SharedMemory(create=True, size=size)
    try:
        _write_into(pa.py_buffer(shm.buf), table)
        rows = c.ask("stdlib", shm.name)
        t1 = time.perf_counter()
    finally:
        gc.collect()
        shm.close()
        shm.unlink()
    _same(rows, table)
    return t1 - t0


def _h_feather(c: _Consumer, table: Any) -> float:
    import pyarrow.feather as feather

    path = f"{SHM}/{_name('feather')}"
    try:
        t0 = time.perf_counter()
        feather.write_feather(table, path, compression="uncompressed")
        rows = c.ask("feather", path)
        t1 = time.perf_counter()
    finally:
        os.unlink(path)
    _same(rows, table)
    return t1 - t0


def _write_into(buf: Any, table: Any) -> None:
    """The IPC stream of *table* into a mutable Arrow buffer, through memcpy (the writer goes with this frame)."""
    import pyarrow as pa

    with pa.ipc.new_stream(pa.FixedSizeBufferWriter(buf), table.schema) as w:
        w.write_table(table)


def _same(rows: Any, table: Any) -> None:
    if rows != table.num_rows:
        raise RuntimeError(f"the consumer answered {rows!r}, expected {table.num_rows} rows")


def _interleave(methods: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Round-robin over the methods so that load drift on a shared machine hits each alike."""
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for m, fn in methods.items():
            gc.collect()
            samples[m].append(fn())
    return samples


HANDOFF = {
    "shmarray": "shmarray share_table + attach_table (default validate='bounds')",
    "shmarray_metadata": "shmarray share_table + attach_table(validate='metadata')",
    "pickle": "pickle through multiprocessing.Pipe",
    "stdlib": "IPC stream via mmap into stdlib SharedMemory, read zero-copy",
    "feather": "Feather on /dev/shm (plain writes) + pa.memory_map",
}


def handoff_samples(table: Any, repeats: int = 7) -> dict[str, list[float]]:
    """End-to-end handoff of *table* to a warm waiting process, each way; seconds per handoff."""
    c = _Consumer()
    try:
        def settled(fn: Callable[[], float]) -> Callable[[], float]:
            # The consumer frees what it got after answering; wait for that
            # outside the timing, so it never overlaps the next sample.
            def one() -> float:
                took = fn()
                c.ask("ping", None)
                return took
            return one

        methods = {
            "shmarray": settled(lambda: _h_shmarray(c, table, "bounds")),
            "shmarray_metadata": settled(lambda: _h_shmarray(c, table, "metadata")),
            "pickle": settled(lambda: _h_pickle(c, table)),
            "stdlib": settled(lambda: _h_stdlib(c, table)),
            "feather": settled(lambda: _h_feather(c, table)),
        }
        return _interleave(methods, repeats)
    finally:
        c.close()


def attach_samples(row_counts: tuple[int, ...] = (1_000, 100_000, 5_000_000), repeats: int = 101,
                   ) -> dict[str, list[float]]:
    """attach_table alone (and dropping the result) per row count and validation level; seconds.

    Also checks, once per table, that every buffer lies inside the mapping.
    """
    import shmarray

    out: dict[str, list[float]] = {}
    for rows in row_counts:
        table = make_table(rows)
        key = _name("a")
        mine = shmarray.share_table(key, table)
        try:
            _check_in_mapping(shmarray.attach_table(key), shmarray.segment_info(key).size)
            for validate in ("metadata", "bounds"):
                xs = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    t = shmarray.attach_table(key, validate=validate)  # type: ignore[arg-type]
                    t1 = time.perf_counter()
                    del t
                    xs.append(t1 - t0)
                out[f"{validate} {rows}"] = xs
        finally:
            del mine
            gc.collect()
    return out


def _check_in_mapping(table: Any, size: int) -> None:
    roots = set()
    for col in table.columns:
        for chunk in col.chunks:
            for b in chunk.buffers():
                if b is None or not b.size:
                    continue
                root = b
                while root.parent is not None:
                    root = root.parent
                if not (root.address <= b.address and b.address + b.size <= root.address + root.size):
                    raise RuntimeError("a buffer lies outside the segment mapping")
                roots.add((root.address, root.size))
    if any(s != size for _, s in roots) or len(roots) > 1:
        raise RuntimeError(f"buffers are not all in one mapping of the segment: {roots}")


def share_samples(table: Any, repeats: int = 7) -> dict[str, list[float]]:
    """share_table alone against the same IPC stream written to /dev/shm with plain writes; seconds."""
    import pyarrow as pa

    import shmarray

    def ours() -> float:
        key = _name("s")
        t0 = time.perf_counter()
        mine = shmarray.share_table(key, table)
        t1 = time.perf_counter()
        del mine
        gc.collect()
        return t1 - t0

    def plain() -> float:
        path = f"{SHM}/{_name('plain')}"
        try:
            t0 = time.perf_counter()
            with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
                w.write_table(table)
            t1 = time.perf_counter()
        finally:
            os.unlink(path)
        return t1 - t0

    return _interleave({"share_table": ours, "plain_write": plain}, repeats)


def write_path_samples(table: Any, repeats: int = 7) -> dict[str, list[float]]:
    """IPC stream into a fresh /dev/shm object: pwrite through the fd vs memcpy through a fresh mapping."""
    import mmap

    import pyarrow as pa

    from shmarray._arrow import _FdSink

    def fresh(size: int) -> tuple[str, int]:
        path = f"{SHM}/{_name('w')}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        return path, fd

    def by_pwrite() -> float:
        t0 = time.perf_counter()
        size = _stream_size(table)
        path, fd = fresh(size)
        try:
            def write(view: memoryview, offset: int) -> None:
                done = 0
                while done < view.nbytes:
                    done += os.pwrite(fd, view[done:], offset + done)

            sink = _FdSink(write, 0)
            with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as w:
                w.write_table(table)
            sink.close()
            t1 = time.perf_counter()
        finally:
            os.close(fd)
            os.unlink(path)
        return t1 - t0

    def by_mapping() -> float:
        t0 = time.perf_counter()
        size = _stream_size(table)
        path, fd = fresh(size)
        try:
            m = mmap.mmap(fd, size)
            _write_into(pa.py_buffer(m), table)
            t1 = time.perf_counter()
            gc.collect()
            m.close()
        finally:
            os.close(fd)
            os.unlink(path)
        return t1 - t0

    return _interleave({"pwrite": by_pwrite, "mapping": by_mapping}, repeats)


# -- report ------------------------------------------------------------------------------


def _ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def main(argv: list[str] | None = None) -> int:
    """Run every measurement once and print medians and ratios."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_arrow", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    table = make_table(args.rows)
    print(f"table: {args.rows:,} rows, {table.nbytes / 1e6:.0f} MB in Arrow, "
          f"IPC stream {_stream_size(table) / 1e6:.0f} MB; medians of {args.repeats}")

    h = handoff_samples(table, args.repeats)
    print("\nhandoff to a waiting process (end to end)")
    for m, label in HANDOFF.items():
        print(f"  {_ms(h[m]):8.1f} ms  {label}")
    ours = _ms(h["shmarray"])
    for m in ("pickle", "stdlib", "feather"):
        print(f"  {m} / shmarray = {_ms(h[m]) / ours:.2f}x;  "
              f"{m} / shmarray(metadata) = {_ms(h[m]) / _ms(h['shmarray_metadata']):.2f}x")

    s = share_samples(table, args.repeats)
    print("\nshare_table alone vs the same IPC stream written to /dev/shm with plain writes")
    print(f"  {_ms(s['share_table']):8.1f} ms share_table, {_ms(s['plain_write']):.1f} ms plain write: "
          f"ratio {_ms(s['share_table']) / _ms(s['plain_write']):.2f}")

    w = write_path_samples(table, args.repeats)
    print("\nwriting the IPC stream into fresh shared memory")
    print(f"  {_ms(w['pwrite']):8.1f} ms pwrite through the fd, {_ms(w['mapping']):.1f} ms through a fresh "
          f"mapping: mapping / pwrite = {_ms(w['mapping']) / _ms(w['pwrite']):.2f}")

    a = attach_samples((1_000, 100_000, args.rows), repeats=max(21, args.repeats))
    print("\nattach_table alone (buffers verified inside the mapping)")
    for label, xs in a.items():
        validate, rows = label.split()
        print(f"  {_ms(xs) * 1e3:9.1f} us  validate={validate!r:11} {int(rows):>10,} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
