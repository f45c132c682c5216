"""arrow: a 5 M-row table (int64, float64, string, bool) -> a warm process.

Handoff: each sample is timed here, end to end, from the table in this
process to the consumer's answer (row count and the sum of the int64
column) back here. The floor is the producer's part alone of the cheapest
honest path: one write of the IPC stream to a /dev/shm file.

In one process: share_table alone (against the same floor), and
attach_table alone at each validation level (the segment held by its
creator meanwhile), which shows what validation costs.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from .._harness import Context, GroupResult, Row, Worker, interleave, recording
from . import _peers as P

NAME = "arrow"
TITLE = "Arrow: share a table with a warm process"

SHMARRAY = "shmarray.share_table + attach_table"
SHMARRAY_META = "shmarray.share_table + attach_table(validate='metadata')"
PIPE = "multiprocessing.Pipe (pickle)"
FEATHER = "Feather (IPC file) on /dev/shm + pa.memory_map"
STDLIB = "stdlib SharedMemory + IPC stream by hand (zero-copy read)"
FLOOR = "floor: IPC stream write to /dev/shm"
SHARE_ALONE = "shmarray.share_table alone"
ATTACH_BOUNDS = "shmarray.attach_table alone (validate='bounds', default)"
ATTACH_META = "shmarray.attach_table alone (validate='metadata')"
ATTACH_FULL = "shmarray.attach_table alone (validate='full')"
WRITE_PWRITE = "write: IPC stream by pwrite through the fd (share_table's path)"
WRITE_MAP = "write: IPC stream by memcpy through a fresh mapping"
ROLES = {WRITE_PWRITE: "floor", WRITE_MAP: "floor", SHMARRAY: "shmarray", SHMARRAY_META: "shmarray", FLOOR: "floor", SHARE_ALONE: "shmarray",
         ATTACH_BOUNDS: "shmarray", ATTACH_META: "shmarray", ATTACH_FULL: "shmarray"}


def make_table(rows: int) -> Any:
    """The benchmark table: int64, float64, string (8-9 characters) and bool columns."""
    import numpy as np
    import pyarrow as pa

    idx = np.arange(rows, dtype=np.int64)
    words = pa.array([f"sym-{i:05d}" for i in range(4096)])
    return pa.table({
        "i": pa.array(idx),
        "f": pa.array(idx * 0.5),
        "s": words.take(pa.array(idx % 4096)),
        "b": pa.array(idx % 3 == 0),
    })


def _answer(t: Any) -> tuple[int, int]:
    import pyarrow.compute as pc

    return t.num_rows, pc.sum(t.column("i")).as_py()


def attach_in_worker(key: str, validate: str) -> tuple[int, int]:
    """attach_table, then the answer; the table is dropped before returning."""
    import shmarray

    t = shmarray.attach_table(key, validate=validate)  # type: ignore[arg-type]
    out = _answer(t)
    del t
    return out


def pickled_in_worker(t: Any) -> tuple[int, int]:
    """The answer for a table that arrived pickled."""
    return _answer(t)


def feather_in_worker(path: str) -> tuple[int, int]:
    """Map a Feather file and answer (zero-copy read)."""
    import pyarrow as pa

    with pa.memory_map(path, "r") as src:
        t = pa.ipc.open_file(src).read_all()
        out = _answer(t)
        del t
    return out


def stdlib_in_worker(name: str) -> tuple[int, int]:
    """Attach a stdlib SharedMemory holding an IPC stream and read it zero-copy."""
    import gc
    from multiprocessing import shared_memory

    import pyarrow as pa

    shm = shared_memory.SharedMemory(name)
    t = pa.ipc.open_stream(pa.py_buffer(shm.buf)).read_all()
    out = _answer(t)
    del t
    try:
        shm.close()
    except BufferError:  # an Arrow buffer still exports the mapping: collect it, then close
        gc.collect()
        shm.close()
    return out


def _stream_size(table: Any) -> int:
    import pyarrow as pa

    mock = pa.MockOutputStream()
    with pa.ipc.new_stream(mock, table.schema) as w:
        w.write_table(table)
    return int(mock.size())


class _Arrow:
    def __init__(self, ctx: Context, w: Worker, table: Any) -> None:
        self.ctx, self.w, self.table = ctx, w, table
        self.want = _answer(table)
        self.phases: dict[str, list[tuple[float, float]]] = {}

    def _check(self, got: Any, label: str) -> None:
        if tuple(got) != self.want:
            raise RuntimeError(f"{label}: the consumer answered {got!r}, expected {self.want!r}")

    def _shmarray(self, validate: str, label: str) -> float:
        import shmarray

        name = self.ctx.cleanup.name("tab")
        h = self.ctx.cleanup.add(f"shmarray {name}", lambda: _unlink(name))
        try:
            t0 = time.perf_counter()
            t = shmarray.share_table(name, self.table)
            t1 = time.perf_counter()
            got = self.w.call(attach_in_worker, name, validate)
            t2 = time.perf_counter()
            del t
        finally:
            self.ctx.cleanup.done(h)
        self._check(got, label)
        if recording():
            self.phases.setdefault(label, []).append((t1 - t0, t2 - t1))
        return t2 - t0

    def m_shmarray(self) -> float:
        return self._shmarray("bounds", SHMARRAY)

    def m_shmarray_meta(self) -> float:
        return self._shmarray("metadata", SHMARRAY_META)

    def m_pipe(self) -> float:
        t0 = time.perf_counter()
        got = self.w.call(pickled_in_worker, self.table)
        t1 = time.perf_counter()
        self._check(got, PIPE)
        return t1 - t0

    def m_feather(self) -> float:
        import pyarrow.feather as feather

        path = P.shm_tag_name(self.ctx.cleanup, "feather")
        h = self.ctx.cleanup.add(path, lambda: os.unlink(path))
        try:
            t0 = time.perf_counter()
            feather.write_feather(self.table, path, compression="uncompressed")
            t1 = time.perf_counter()
            got = self.w.call(feather_in_worker, path)
            t2 = time.perf_counter()
        finally:
            self.ctx.cleanup.done(h)
        self._check(got, FEATHER)
        if recording():
            self.phases.setdefault(FEATHER, []).append((t1 - t0, t2 - t1))
        return t2 - t0

    def m_stdlib(self) -> float:
        import pyarrow as pa
        from multiprocessing import shared_memory

        name = self.ctx.cleanup.name("std")
        t0 = time.perf_counter()
        shm = shared_memory.SharedMemory(name, create=True, size=_stream_size(self.table))

        def undo() -> None:
            import gc

            gc.collect()
            shm.close()
            shm.unlink()

        h = self.ctx.cleanup.add(f"stdlib {name}", undo)
        try:
            _write_into(pa.py_buffer(shm.buf), self.table)
            t1 = time.perf_counter()
            got = self.w.call(stdlib_in_worker, name)
            t2 = time.perf_counter()
        finally:
            self.ctx.cleanup.done(h)
        self._check(got, STDLIB)
        if recording():
            self.phases.setdefault(STDLIB, []).append((t1 - t0, t2 - t1))
        return t2 - t0

    def share_alone(self) -> float:
        import shmarray

        name = self.ctx.cleanup.name("tab")
        h = self.ctx.cleanup.add(f"shmarray {name}", lambda: _unlink(name))
        try:
            t0 = time.perf_counter()
            t = shmarray.share_table(name, self.table)
            t1 = time.perf_counter()
            del t
        finally:
            self.ctx.cleanup.done(h)
        return t1 - t0

    def f_stream(self) -> float:
        import pyarrow as pa

        path = P.shm_tag_name(self.ctx.cleanup, "stream")
        h = self.ctx.cleanup.add(path, lambda: os.unlink(path))
        try:
            t0 = time.perf_counter()
            with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, self.table.schema) as w:
                w.write_table(self.table)
            t1 = time.perf_counter()
        finally:
            self.ctx.cleanup.done(h)
        return t1 - t0


    def _fresh(self, size: int) -> tuple[str, int, int]:
        path = P.shm_tag_name(self.ctx.cleanup, "w")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        h = self.ctx.cleanup.add(path, lambda: os.unlink(path))
        os.ftruncate(fd, size)
        return path, fd, h

    def w_pwrite(self) -> float:
        import pyarrow as pa

        from shmarray._arrow import _FdSink

        t0 = time.perf_counter()
        _, fd, h = self._fresh(_stream_size(self.table))
        try:
            def write(view: memoryview, offset: int) -> None:
                done = 0
                while done < view.nbytes:
                    done += os.pwrite(fd, view[done:], offset + done)

            sink = _FdSink(write, 0)
            with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), self.table.schema) as w:
                w.write_table(self.table)
            sink.close()
            t1 = time.perf_counter()
        finally:
            os.close(fd)
            self.ctx.cleanup.done(h)
        return t1 - t0

    def w_mapping(self) -> float:
        import gc
        import mmap

        import pyarrow as pa

        t0 = time.perf_counter()
        size = _stream_size(self.table)
        _, fd, h = self._fresh(size)
        try:
            m = mmap.mmap(fd, size)
            _write_into(pa.py_buffer(m), self.table)
            t1 = time.perf_counter()
            gc.collect()
            m.close()
        finally:
            os.close(fd)
            self.ctx.cleanup.done(h)
        return t1 - t0


def _write_into(buf: Any, table: Any) -> None:
    """The IPC stream of *table* into a mutable Arrow buffer (the writer goes with this frame)."""
    import pyarrow as pa

    with pa.ipc.new_stream(pa.FixedSizeBufferWriter(buf), table.schema) as w:
        w.write_table(table)


def _attach_alone(key: str, validate: str) -> Callable[[], float]:
    def sample() -> float:
        import shmarray

        t0 = time.perf_counter()
        t = shmarray.attach_table(key, validate=validate)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        del t
        return t1 - t0

    return sample


def _unlink(name: str) -> None:
    import shmarray

    try:
        shmarray.unlink(name)
    except shmarray.NotFoundError:
        pass


def run(ctx: Context) -> GroupResult:
    """Measure every way to hand the table over."""
    res = GroupResult(NAME, TITLE)
    import shmarray

    rows = 200_000 if ctx.quick else 5_000_000
    table = make_table(rows)
    variant = f"{rows / 1e6:g} M rows, {table.nbytes / 2**20:.0f} MiB"
    methods: dict[str, Callable[[], float]] = {}
    with Worker() as w:
        w.call(P.import_in_worker, "pyarrow", "pyarrow.compute", "pyarrow.feather", "shmarray")
        a = _Arrow(ctx, w, table)
        if hasattr(shmarray, "share_table") and hasattr(shmarray, "attach_table"):
            methods[SHMARRAY] = a.m_shmarray
            methods[SHMARRAY_META] = a.m_shmarray_meta
        else:
            res.rows.append(Row(SHMARRAY, [], variant=variant, role="shmarray",
                                error="shmarray.share_table/attach_table not available in this checkout"))
        methods[PIPE] = a.m_pipe
        methods[STDLIB] = a.m_stdlib
        methods[FEATHER] = a.m_feather
        methods[FLOOR] = a.f_stream
        reps = ctx.reps(11, 3)
        ctx.log(f"  handoff, {variant}: {len(methods)} methods x {reps}")
        samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
    for label in methods:
        extra: dict[str, Any] = {"rows": rows, "table_bytes": table.nbytes}
        ph = a.phases.get(label, [])[-len(samples[label]):] if samples[label] else []
        if ph:
            extra["producer_s"] = [round(p, 6) for p, _ in ph]
            extra["handoff_and_consumer_s"] = [round(c, 6) for _, c in ph]
        res.rows.append(Row(label, samples[label], variant=variant, role=ROLES.get(label, "peer"),
                            error=errors.get(label, ""), extra=extra))
    res.notes.append(
        "The consumer answers the row count and the sum of the int64 column (so it reads one column). "
        "attach_table validates 'bounds' by default (every string offset: O(rows) of the string "
        "column); 'metadata' checks only the structure. Per-phase split (producer / handoff+consumer) "
        "in results.json."
    )
    if SHMARRAY in methods:
        _in_one_process(ctx, res, a, table, f"in one process, {rows / 1e6:g} M rows")
        res.notes.append(
            "In one process: share_table alone against the floor (the same IPC stream written to a "
            "/dev/shm file), attach_table alone at each validation level while the creator holds "
            "the segment, and the two ways to write the IPC stream into a fresh /dev/shm file "
            "(pwrite through the fd, what share_table does, and memcpy through a fresh mapping)."
        )
        _by_rows(ctx, res, (1_000,) if ctx.quick else (1_000, 100_000))
    ours, feather = res.median(SHMARRAY, variant=variant), res.median(FEATHER, variant=variant)
    if ours is not None and feather is not None:
        r = feather / ours
        res.headline("arrow: Feather-on-/dev/shm time / shmarray share_table+attach_table time", r, "> 1",
                     r > 1, f"{variant}: shmarray {ours * 1e3:.1f} ms vs Feather {feather * 1e3:.1f} ms")
    else:
        res.headline("arrow: Feather-on-/dev/shm time / shmarray time", None, "> 1", None, "not measured")
    return res


def _in_one_process(ctx: Context, res: GroupResult, a: _Arrow, table: Any, variant: str) -> None:
    """share_table alone vs the write floor; attach_table alone per validation level."""
    import shmarray

    key = ctx.cleanup.name("tab")
    h = ctx.cleanup.add(f"shmarray {key}", lambda: _unlink(key))
    try:
        held = shmarray.share_table(key, table)
        methods: dict[str, Callable[[], float]] = {
            SHARE_ALONE: a.share_alone,
            FLOOR: a.f_stream,
            ATTACH_BOUNDS: _attach_alone(key, "bounds"),
            ATTACH_META: _attach_alone(key, "metadata"),
            ATTACH_FULL: _attach_alone(key, "full"),
            WRITE_PWRITE: a.w_pwrite,
            WRITE_MAP: a.w_mapping,
        }
        reps = ctx.reps(11, 3)
        ctx.log(f"  {variant}: {len(methods)} methods x {reps}")
        samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
        del held
    finally:
        ctx.cleanup.done(h)
    for label in methods:
        res.rows.append(Row(label, samples[label], variant=variant, role=ROLES.get(label, "peer"),
                            error=errors.get(label, "")))


def _by_rows(ctx: Context, res: GroupResult, row_counts: tuple[int, ...]) -> None:
    """attach_table alone per row count and validation level; buffers checked inside the mapping once."""
    import shmarray

    variant = "attach_table alone, by row count"
    for rows in row_counts:
        table = make_table(rows)
        key = ctx.cleanup.name("tab")
        h = ctx.cleanup.add(f"shmarray {key}", lambda k=key: _unlink(k))  # type: ignore[misc]
        try:
            held = shmarray.share_table(key, table)
            _check_in_mapping(shmarray.attach_table(key), shmarray.segment_info(key).size)
            methods = {f"shmarray.attach_table alone (validate={v!r}), {rows:,} rows": _attach_alone(key, v)
                       for v in ("metadata", "bounds")}
            # Calls of microseconds: blocks of 11 (10 kept) keep the round-robin cheap.
            samples, errors = interleave(ctx, methods, reps=ctx.reps(101, 9), warmup=1, block=11)
            del held
        finally:
            ctx.cleanup.done(h)
        for label in methods:
            res.rows.append(Row(label, samples[label], variant=variant, role="shmarray",
                                error=errors.get(label, ""), extra={"rows": rows}))


def _check_in_mapping(table: Any, size: int) -> None:
    """Every buffer of *table* lies inside one mapping of the segment (*size* bytes)."""
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
