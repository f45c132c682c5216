"""NumPy arrays between processes: shmarray's share/create/attach against the stdlib, pickling and torch.

Run ``python -m benchmarks.bench_arrays [--size-mb N] [--repeats R]``. Every
``*_samples`` function is importable and returns plain samples (seconds), so
the unified harness can call them; ``main`` prints medians and ratios from
one run. Methods are interleaved round-robin within each measurement, so
load drift on a shared machine hits them alike.

share_samples
    end to end, from a float64 array in private memory to its sum computed
    by a warm, waiting spawned process and returned: ``shmarray.share`` (the
    consumer attaches by key), stdlib ``SharedMemory`` by hand (create, copy
    through the mapping, send name/shape/dtype, attach, sum), pickling
    through ``multiprocessing.Pipe``, and torch ``share_memory_()`` + send
    when torch is installed. Teardown comes after the clock stops.
create_samples
    ``shmarray.create`` + a fill in place + the consumer attaches and sums,
    split into phases: create(), the fill, the consumer's attach, its sum,
    and the handoff (pipe round trip minus what the consumer timed itself).
    Also create() of a 4 KiB array (its fixed cost) and ``posix_fallocate``
    of the same size into a fresh /dev/shm file (the page reservation that
    create() does so that a full /dev/shm is an error, not a SIGBUS).
attach_samples
    name in, ndarray out, timed in the attaching process: the first attach
    in a *fresh* process -- a spawned multiprocessing child (which inherits
    the parent's resource tracker) and a new interpreter (which starts its
    own) -- and the steady state in a warm process, for several sizes.
    Peers: stdlib ``SharedMemory(name)`` + ``np.ndarray``, and SharedArray's C
    attach when it is installed. A new interpreter's sample is also reported
    with the library's import included (numpy is imported before the clock).
write_path_samples
    the write paths share() and create(fill=) chose among (see there).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from ._harness import Cleanup
from .groups import _peers as P

__all__ = ["share_samples", "create_samples", "attach_samples", "write_path_samples", "main"]

SHM = "/dev/shm"


def _tag(what: str) -> str:
    return f"shmbench-{os.getpid()}-{what}-{secrets.token_hex(4)}"


def _interleave(methods: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[Any]]:
    """Each method *repeats* times, round-robin (rotating), after *warmup* unrecorded rounds."""
    out: dict[str, list[Any]] = {m: [] for m in methods}
    names = list(methods)
    for rnd in range(-warmup, repeats):
        k = rnd % len(names)
        for m in names[k:] + names[:k]:
            value = methods[m]()
            if rnd >= 0:
                out[m].append(value)
    return out


# -- in the consumer process ---------------------------------------------------------------------


def _import(*modules: str) -> None:
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            pass


def _attach_sum(method: str, name: str, shape: tuple[int, ...], dtype: str) -> tuple[float, float, float, float]:
    """(sum, attach s, sum s, teardown s) of segment *name*, attached the way *method* does.

    Teardown (dropping the array: unmapping it) is timed apart: for 512 MiB it
    is ~20 ms of page-table work, after the sum, whichever method mapped it.
    """
    t0 = time.perf_counter()
    if method == "shmarray":
        import shmarray

        arr = shmarray.attach(name)
        close: Callable[[], Any] = arr.close
    else:
        from multiprocessing import shared_memory

        # (Workers share this process's resource tracker, which already tracks the name.)
        shm = shared_memory.SharedMemory(name)
        arr = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf)
        close = shm.close
    t1 = time.perf_counter()
    total = float(arr.sum())
    t2 = time.perf_counter()
    del arr
    close()
    return total, t1 - t0, t2 - t1, time.perf_counter() - t2


def _sum(arr: Any) -> float:
    return float(np.asarray(arr).sum())


def _sum_tensor(t: Any) -> float:
    total = float(t.numpy().sum())
    del t
    return total


# One attach in a new interpreter, printed as two numbers: the attach alone
# (numpy and the library imported before the clock starts) and the library's
# import plus the attach (numpy, which every method needs, still before it).
_FRESH = r"""
import sys, time
import numpy as np
method, name, dtype = sys.argv[1], sys.argv[2], sys.argv[4]
shape = tuple(int(x) for x in sys.argv[3].split(",") if x)
t_import = time.perf_counter()
if method == "shmarray":
    import shmarray
elif method == "SharedArray":
    import SharedArray
else:
    from multiprocessing import resource_tracker, shared_memory
t0 = time.perf_counter()
if method == "shmarray":
    arr = shmarray.attach(name)
elif method == "SharedArray":
    arr = SharedArray.attach("shm://" + name)
else:
    shm = shared_memory.SharedMemory(name)
    arr = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf)
t1 = time.perf_counter()
if method == "stdlib":
    resource_tracker.unregister(shm._name, "shared_memory")
print(t1 - t0, t1 - t_import)
"""


# -- in this process ---------------------------------------------------------------------------------


def _worker() -> Any:
    from ._harness import Worker

    w = Worker()
    w.call(_import, "numpy", "shmarray", "multiprocessing.shared_memory", "torch", "torch.multiprocessing")
    return w


def share_samples(size: int, repeats: int, *, torch: bool = True) -> dict[str, list[float]]:
    """End-to-end handoff of a *size*-byte float64 array to a waiting process that returns its sum."""
    src = np.arange(size // 8, dtype=np.float64)
    want = float(src.sum())
    shape = src.shape
    w = _worker()
    use_torch = torch and _have("torch")
    if use_torch:
        import torch as _torch
        import torch.multiprocessing  # noqa: F401 - registers torch's shared-memory reductions

    cleanup = Cleanup()

    def by_name(method: str) -> Callable[[], float]:
        def one() -> float:
            name = cleanup.name(method[:3])
            t0 = time.perf_counter()
            made = P.make(method, name, cleanup, src, shape, src.dtype)
            try:
                got, _, _, _ = w.call(_attach_sum, method, name, shape, "<f8")
                t1 = time.perf_counter()
            finally:
                made.release()
            _check(got, want, method)
            return t1 - t0
        return one

    def pipe() -> float:
        t0 = time.perf_counter()
        got = w.call(_sum, src)
        t1 = time.perf_counter()
        _check(got, want, "pipe")
        return t1 - t0

    def torch_share() -> float:
        t0 = time.perf_counter()
        t = _torch.from_numpy(src)
        t.share_memory_()
        got = w.call(_sum_tensor, t)
        t1 = time.perf_counter()
        del t
        _check(got, want, "torch")
        return t1 - t0

    methods: dict[str, Callable[[], float]] = {
        "shmarray.share": by_name(P.SHMARRAY),
        "stdlib SharedMemory by hand": by_name(P.STDLIB),
        "multiprocessing.Pipe (pickle)": pipe,
    }
    if use_torch:
        methods["torch share_memory_() + send"] = torch_share
    try:
        return _interleave(methods, repeats)
    finally:
        w.close()
        cleanup.sweep()


def _fallocate(size: int) -> float:
    path = os.path.join(SHM, _tag("falloc"))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        t0 = time.perf_counter()
        os.posix_fallocate(fd, 0, size)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


def create_samples(size: int, repeats: int) -> dict[str, list[float]]:
    """shmarray.create + fill in place + a waiting process attaches and sums, phase by phase."""
    import shmarray

    src = np.arange(size // 8, dtype=np.float64)
    want = float(src.sum())
    w = _worker()
    out: dict[str, list[float]] = {k: [] for k in (
        "create()", "fill in place", "consumer attach", "consumer sum", "consumer teardown (unmap)",
        "handoff (pipe round trip)",
        "sharing: create() + handoff + attach", "create() of 4 KiB", "posix_fallocate of the same size",
        "floor: fill fresh shared pages (first touch)")}

    def one() -> None:
        name = _tag("cre")
        t0 = time.perf_counter()
        a = shmarray.create(name, src.shape)
        t1 = time.perf_counter()
        try:
            np.copyto(a, src)
            t2 = time.perf_counter()
            got, att, summ, down = w.call(_attach_sum, "shmarray", name, src.shape, "<f8")
            t3 = time.perf_counter()
        finally:
            a.close()
            del a
        _check(got, want, "create")
        handoff = (t3 - t2) - att - summ - down
        out["create()"].append(t1 - t0)
        out["fill in place"].append(t2 - t1)
        out["consumer attach"].append(att)
        out["consumer sum"].append(summ)
        out["consumer teardown (unmap)"].append(down)
        out["handoff (pipe round trip)"].append(handoff)
        out["sharing: create() + handoff + attach"].append((t1 - t0) + handoff + att)

    def small() -> None:
        name = _tag("cre4k")
        t0 = time.perf_counter()
        a = shmarray.create(name, 512)
        out["create() of 4 KiB"].append(time.perf_counter() - t0)
        a.close()

    def reserve() -> None:
        out["posix_fallocate of the same size"].append(_fallocate(size))

    def first_touch() -> None:
        import mmap

        m = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS: shmem pages, as in /dev/shm
        try:
            dst = np.frombuffer(m, np.float64)
            t0 = time.perf_counter()
            np.copyto(dst, src)
            out["floor: fill fresh shared pages (first touch)"].append(time.perf_counter() - t0)
            del dst
        finally:
            m.close()

    try:
        _interleave({"one": one, "small": small, "reserve": reserve, "touch": first_touch}, repeats)
    finally:
        w.close()
    return out


def attach_samples(sizes: list[int], repeats: int) -> dict[tuple[str, str, int], list[float]]:
    """{(variant, method, size): seconds}: name in, ndarray out, timed in the attaching process.

    Methods (groups._peers names): shmarray, stdlib, and SharedArray when it
    is installed.
    Variants: "spawned child", "new interpreter", "new interpreter, import
    included" (the library's import plus the attach) and "warm process".
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # as in any program that uses multiprocessing: children inherit it
    kinds = [P.SHMARRAY, P.STDLIB] + ([P.SHAREDARRAY] if P.peer_missing(P.SHAREDARRAY) is None else [])
    cleanup = Cleanup()
    out: dict[tuple[str, str, int], list[float]] = {}
    # New interpreters import from bytecode, as an installed package does: a
    # cache of their own (the unrecorded warm-up round fills it), even where
    # PYTHONDONTWRITEBYTECODE is set, so that no sample compiles a module.
    pycache = tempfile.TemporaryDirectory(prefix="shmbench-pycache-")
    fresh_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    fresh_env["PYTHONPYCACHEPREFIX"] = pycache.name
    warm = _worker()
    try:
        warm.call(_import, "SharedArray")
        for size in sizes:
            shape = (size // 8,)
            shape_arg = ",".join(map(str, shape))
            meta: P.Meta = (shape, "<f8")
            made = {m: P.make(m, cleanup.name(f"att{m[:3]}"), cleanup, None, shape, np.dtype(np.float64))
                    for m in kinds}
            try:
                def spawned(m: str) -> Callable[[], float]:
                    def one() -> float:
                        from ._harness import Worker

                        with Worker() as fresh:
                            fresh.call(_import, "numpy", "shmarray", "multiprocessing.shared_memory", "SharedArray")
                            return float(fresh.call(P.attach_in_worker, m, made[m].name, meta))
                    return one

                def interpreter(m: str) -> Callable[[], tuple[float, float]]:
                    def one() -> tuple[float, float]:
                        r = subprocess.run([sys.executable, "-c", _FRESH, m, made[m].name, shape_arg, "<f8"],
                                           capture_output=True, text=True, timeout=60, env=fresh_env)
                        if r.returncode:
                            raise RuntimeError(r.stderr[-2000:])
                        alone, with_import = r.stdout.split()[:2]
                        return float(alone), float(with_import)
                    return one

                def steady(m: str) -> Callable[[], float]:
                    return lambda: float(warm.call(P.attach_in_worker, m, made[m].name, meta))

                methods: dict[str, Callable[[], Any]] = {}
                for m in kinds:
                    methods[f"spawned child|{m}"] = spawned(m)
                    methods[f"new interpreter|{m}"] = interpreter(m)
                for m in kinds:
                    methods[f"warm process|{m}"] = steady(m)
                res = _interleave(methods, repeats)
                for k, v in res.items():
                    variant, m = k.split("|")
                    if variant == "new interpreter":
                        out[(variant, m, size)] = [a for a, _ in v]
                        out[("new interpreter, import included", m, size)] = [b for _, b in v]
                    else:
                        out[(variant, m, size)] = v
            finally:
                for mk in made.values():
                    mk.release()
    finally:
        warm.close()
        pycache.cleanup()
        cleanup.sweep()
    return out


def write_path_samples(size: int, repeats: int) -> dict[str, list[float]]:
    """The ways to put *size* bytes into a fresh /dev/shm file, each timed from empty file to written.

    What share() and create(fill=) chose among: pwrite from the source (one
    thread, or two threads on two halves: os.pwrite releases the GIL), and
    posix_fallocate + mmap + copy (or ftruncate + mmap + copy, which is what a
    plain mapping does); for a fill value, pwrite of a repeated 4 MiB chunk
    against posix_fallocate + mmap + ndarray.fill.
    """
    import mmap
    import threading

    src = np.random.default_rng(0).random(size // 8)
    raw = memoryview(src).cast("B")

    def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done : done + (1 << 30)], offset + done)

    def timed(body: Callable[[int], None]) -> Callable[[], float]:
        def one() -> float:
            path = os.path.join(SHM, _tag("wp"))
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                t0 = time.perf_counter()
                body(fd)
                return time.perf_counter() - t0
            finally:
                os.close(fd)
                os.unlink(path)
        return one

    def pwrite1(fd: int) -> None:
        os.ftruncate(fd, size)
        pwrite_all(fd, raw, 0)

    def pwrite2(fd: int) -> None:
        os.ftruncate(fd, size)
        half = size // 2
        t = threading.Thread(target=pwrite_all, args=(fd, raw[half:], half))
        t.start()
        pwrite_all(fd, raw[:half], 0)
        t.join()

    def mapped(reserve: bool, fill: bool) -> Callable[[int], None]:
        def body(fd: int) -> None:
            if reserve:
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
            dst = np.frombuffer(m, np.float64)
            if fill:
                dst.fill(1.5)
            else:
                np.copyto(dst, src)
            del dst
            m.close()
        return body

    def pattern(fd: int) -> None:
        os.ftruncate(fd, size)
        chunk = np.full(min(size, 4 << 20) // 8, 1.5)
        view = memoryview(chunk).cast("B")
        for off in range(0, size, view.nbytes):
            pwrite_all(fd, view[: min(view.nbytes, size - off)], off)

    return _interleave({
        "copy: pwrite, 1 thread (share)": timed(pwrite1),
        "copy: pwrite, 2 threads": timed(pwrite2),
        "copy: posix_fallocate + mmap + copyto": timed(mapped(True, False)),
        "copy: ftruncate + mmap + copyto": timed(mapped(False, False)),
        "fill: pwrite of a 4 MiB chunk (create(fill=))": timed(pattern),
        "fill: posix_fallocate + mmap + fill": timed(mapped(True, True)),
        "zeros: posix_fallocate (create())": timed(lambda fd: os.posix_fallocate(fd, 0, size)),
    }, repeats)


def _check(got: float, want: float, what: str) -> None:
    import math

    if not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-6):
        raise RuntimeError(f"{what}: the consumer summed {got!r}, expected {want!r}")


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- report --------------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:8.2f} ms" if s >= 1e-3 else f"{s * 1e6:8.1f} us"


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements with small repeats and print medians and ratios."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_arrays", description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=512, help="array size for share/create (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="samples per method (default 5)")
    p.add_argument("--attach-sizes-mb", default="1,64,512", help="sizes for attach (default 1,64,512)")
    p.add_argument("--only", choices=["share", "create", "attach", "write"], action="append")
    args = p.parse_args(argv)
    size = args.size_mb << 20
    only = set(args.only or ["share", "create", "attach", "write"])
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} cpus; medians of "
          f"{args.repeats} (interleaved)")

    if "share" in only:
        print(f"\nshare: {args.size_mb} MiB float64 array -> a waiting spawned process returns its sum")
        res = share_samples(size, args.repeats)
        ours = _med(res["shmarray.share"])
        for m, xs in res.items():
            ratio = "" if m == "shmarray.share" else f"   {_med(xs) / ours:5.2f}x shmarray's time"
            print(f"  {m:32s} {_ms(_med(xs))}  (min {_ms(min(xs)).strip()}){ratio}")

    if "create" in only:
        print(f"\ncreate: {args.size_mb} MiB create() + fill in place + a waiting process attaches and sums")
        res = create_samples(size, args.repeats)
        for m, xs in res.items():
            print(f"  {m:40s} {_ms(_med(xs))}  (min {_ms(min(xs)).strip()})")
        sharing = _med(res["sharing: create() + handoff + attach"])
        reserve = _med(res["posix_fallocate of the same size"])
        fixed = _med(res["create() of 4 KiB"]) + _med(res["handoff (pipe round trip)"]) + _med(res["consumer attach"])
        extra = (_med(res["create()"]) + _med(res["fill in place"])
                 - _med(res["floor: fill fresh shared pages (first touch)"]))
        print(f"  sharing beyond the page reservation (sharing - posix_fallocate): {_ms(sharing - reserve).strip()}")
        print(f"  fixed part (create() of 4 KiB + handoff + consumer attach):       {_ms(fixed).strip()}")
        print(f"  create() + fill in place - first-touch fill of fresh shared pages: {_ms(extra).strip()}")

    if "write" in only:
        print(f"\nwrite paths: {args.size_mb} MiB into a fresh /dev/shm file")
        res3 = write_path_samples(size, args.repeats)
        for m, xs in res3.items():
            print(f"  {m:48s} {_ms(_med(xs))}  {size / _med(xs) / 1e9:5.2f} GB/s")

    if "attach" in only:
        sizes = [int(s) << 20 for s in args.attach_sizes_mb.split(",")]
        print("\nattach: name in, ndarray out (timed in the attaching process)")
        res2 = attach_samples(sizes, args.repeats)
        for variant in ("spawned child", "new interpreter", "new interpreter, import included", "warm process"):
            for s in sizes:
                a = _med(res2[(variant, P.SHMARRAY, s)])
                b = _med(res2[(variant, P.STDLIB, s)])
                line = (f"  {variant:32s} {s >> 20:5d} MiB  shmarray {_ms(a)}   stdlib {_ms(b)}   "
                        f"stdlib/shmarray {b / a:5.2f}x")
                c = res2.get((variant, P.SHAREDARRAY, s))
                if c:
                    line += f"   SharedArray {_ms(_med(c))}   shmarray/SharedArray {a / _med(c):5.2f}x"
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
