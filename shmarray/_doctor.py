"""``shmarray doctor`` / ``shmarray.doctor()``: what limits this machine's shared memory, and the fix.

It reads, never changes: the segment directory's mount (``/proc/self/mountinfo``),
its size and free space, whether huge pages back new segments there, the
kernel's ``shmem_enabled``, ``RLIMIT_NOFILE`` and ``vm.max_map_count``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
from typing import Any

from ._display import human as _human
from ._os import backend
from ._lifecycle import Dir
from ._lifecycle import check_dir as _check_dir

__all__ = ["Doctor", "Problem", "doctor"]

# Docker's default /dev/shm; anything this small is a container's default, not a choice.
_SMALL = 64 << 20
_HUGE_PAGE = 2 << 20
_NOFILE_LOW = 4096
_MAPS_LOW = 65530
_TMPFS_LINE = "mount -t tmpfs -o size=16g,huge=within_size tmpfs /mnt/shm"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding and what to do about it: a problem (something is wrong or limiting) or advice (faster)."""

    what: str
    fix: str


@dataclasses.dataclass(frozen=True)
class Doctor:
    """The facts ``shmarray doctor`` reports (``as_dict()`` is its ``--json``)."""

    dir: str
    exists: bool
    writable: bool
    fs_type: str | None
    mount_point: str | None
    mount_options: str | None
    size_bytes: int | None
    free_bytes: int | None
    page_size: int
    huge: str | None
    huge_pages_back_new_segments: bool
    shmem_enabled: str | None
    nofile_soft: int
    nofile_hard: int
    max_map_count: int | None
    small_container_default: bool
    problems: tuple[Problem, ...]  # something is wrong or limits what segments can do here
    # What would make it faster (huge pages), not wrong: an ordinary machine's /dev/shm has
    # 4 KiB pages, and its fix needs root, so it is no problem to report first everywhere.
    advice: tuple[Problem, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The facts as plain data (``shmarray doctor --json``)."""
        d = dataclasses.asdict(self)
        d["problems"] = [dataclasses.asdict(p) for p in self.problems]
        d["advice"] = [dataclasses.asdict(p) for p in self.advice]
        return d

    def to_json(self) -> str:
        """``shmarray doctor --json``."""
        return json.dumps(self.as_dict(), indent=2)

    def to_text(self) -> str:
        """What ``shmarray doctor`` prints in a terminal."""
        size = "-" if self.size_bytes is None else _human(self.size_bytes)
        free = "-" if self.free_bytes is None else _human(self.free_bytes)
        huge = "yes" if self.huge_pages_back_new_segments else "no"
        rows = [
            ("segment directory", self.dir + ("" if self.exists else " (does not exist)")),
            ("file system", f"{self.fs_type or '-'} on {self.mount_point or '-'} ({self.mount_options or '-'})"),
            ("size / free", f"{size} / {free}"),
            ("page size", f"{_human(self.page_size)}" + (f", huge={self.huge}" if self.huge else "")),
            ("huge pages back new segments", huge),
            ("shmem_enabled (kernel)", self.shmem_enabled or "-"),
            ("RLIMIT_NOFILE", f"{self.nofile_soft} (hard {self.nofile_hard})"),
            ("vm.max_map_count", "-" if self.max_map_count is None else str(self.max_map_count)),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        if self.problems:
            lines.append("\nproblems:")
            for i, p in enumerate(self.problems, 1):
                lines.append(f"{i}. {p.what}")
                lines.append(f"   fix: {p.fix}")
        else:
            lines.append("\nno problems found")
        if self.advice:
            lines.append("\nadvice (not a problem: faster if you can):")
            for p in self.advice:
                lines.append(f"- {p.what}")
                lines.append(f"  how: {p.fix}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.to_text()


def _option(options: str, name: str) -> str | None:
    for item in options.split(","):
        k, _, v = item.partition("=")
        if k == name:
            return v
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def doctor(dir: Dir = None) -> Doctor:
    """The facts that limit shared memory for segments in *dir*, as ``shmarray doctor`` reports them.

    Nothing is changed.

    Parameters
    ----------
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    Doctor
        ``problems`` (a tuple): what is wrong or limiting, each with its fix (a Docker
        flag, a Kubernetes volume, a mount line, a limit to raise).
        ``advice``: what would be faster though nothing is wrong (huge
        pages). ``as_dict()`` is ``shmarray doctor --json``.

    Examples
    --------
    >>> import shmarray
    >>> report = shmarray.doctor()
    >>> isinstance(report.problems, tuple) and isinstance(report.advice, tuple)
    True
    """
    d = (_check_dir(dir) if dir is not None else None) or backend.SHM_DIR
    exists = os.path.isdir(d)
    writable = exists and os.access(d, os.W_OK | os.X_OK)
    mount = backend.mount_of(d) if exists else None
    point, fs, options = mount if mount is not None else (None, None, None)
    size = free = None
    if exists:
        free, size = backend.statvfs_bytes(d)
    huge = _option(options or "", "huge") if fs == "tmpfs" else None
    page = backend.PAGE_SIZE
    if fs == "hugetlbfs":
        huge = "hugetlbfs"
        page = os.statvfs(d).f_bsize if exists else _HUGE_PAGE  # the mount's huge page size
    # advise: shmarray fills fresh segments through a mapping that asks for huge pages.
    backed = (fs == "tmpfs" and huge in ("always", "within_size", "advise")) or fs == "hugetlbfs"
    shmem = _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    if shmem is not None and "[" in shmem:
        shmem = shmem[shmem.index("[") + 1:shmem.index("]")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    maps_text = _read("/proc/sys/vm/max_map_count")
    maps = int(maps_text) if maps_text and maps_text.isdigit() else None
    small = point == "/dev/shm" and size is not None and size <= _SMALL

    problems: list[Problem] = []
    advice: list[Problem] = []
    if not exists:
        problems.append(Problem(f"the segment directory {d} does not exist (shmarray never creates it)",
                                f"create or mount it ({_TMPFS_LINE}), or unset SHMARRAY_DIR"))
    elif not writable:
        problems.append(Problem(f"{d} cannot be written by this user, so no segment can be created there",
                                "use a directory you can write (chmod, or SHMARRAY_DIR=...)"))
    if small:
        problems.append(Problem(
            f"/dev/shm is {_human(size or 0)}: a container's default, too small for large arrays",
            "Docker: run with --shm-size=16g (or --ipc=host); Kubernetes: mount an emptyDir with "
            "medium: Memory and a sizeLimit at /dev/shm"))
    if exists and fs is not None and fs not in ("tmpfs", "hugetlbfs", "ramfs"):
        problems.append(Problem(
            f"{d} is on {fs}, a disk file system: segments work, but the kernel writes their pages "
            "back to disk",
            f"use a tmpfs: {_TMPFS_LINE} and SHMARRAY_DIR=/mnt/shm"))
    if fs == "hugetlbfs":
        if exists and free == 0:
            problems.append(Problem(
                f"{d} is hugetlbfs with no free huge pages: no segment can be created there",
                "reserve pages as root (sysctl -w vm.nr_hugepages=N, N pages of 2 MiB), or use a tmpfs "
                f"with transparent huge pages, which needs no reservation: {_TMPFS_LINE}"))
    elif exists and fs == "tmpfs" and not backed:
        advice.append(Problem(
            f"huge pages would be faster: {d} is a tmpfs with 4 KiB pages, so filling fresh shared memory "
            "is bound by page faults (~2 us a page), not by memory bandwidth",
            f"as root: {_TMPFS_LINE}, then SHMARRAY_DIR=/mnt/shm. In a container, bind-mount such a "
            "host tmpfs (Docker -v /mnt/shm:/mnt/shm; Kubernetes a hostPath volume): Docker's "
            "--tmpfs/--shm-size and Kubernetes' emptyDir medium: Memory give 4 KiB pages"))
    if soft < _NOFILE_LOW:
        problems.append(Problem(
            f"RLIMIT_NOFILE is {soft}: each attached segment holds two descriptors",
            f"ulimit -n {min(hard, 65536)} in the shell, or "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({min(hard, 65536)}, {hard})) in Python"))
    if maps is not None and maps < _MAPS_LOW:
        problems.append(Problem(f"vm.max_map_count is {maps}: each attached segment is one mapping",
                                "sysctl -w vm.max_map_count=262144 (as root)"))
    if size and free is not None and free < size // 10:
        problems.append(Problem(f"{d} is {100 - free * 100 // size}% full",
                                "shmarray gc removes segments nobody is attached to; shmarray ls shows the rest"))
    return Doctor(d, exists, writable, fs, point, options, size, free, page, huge, backed, shmem,
                  soft, hard, maps, small, tuple(problems), tuple(advice))
