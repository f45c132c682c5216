"""The machine, the versions and the conditions a run measured under."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from typing import Any

from ._harness import version_of

__all__ = ["describe", "render"]

# Distributions whose versions go into every result (None: not installed).
PEERS = ("numpy", "pyarrow", "posix_ipc", "sysv_ipc", "SharedArray", "torch", "matplotlib", "pandas")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return None


def _git() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--",
             "shmarray", "benchmarks"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' (modified)' if dirty else ''}" if head else None


def describe(quick: bool, groups: list[str]) -> dict[str, Any]:
    """Machine, versions and conditions, as a JSON-ready dict."""
    st = os.statvfs("/dev/shm")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    import shmarray

    versions = {"python": platform.python_version(), "shmarray": shmarray.__version__}
    versions.update({name: version_of(name) for name in PEERS})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "usable_cores": affinity,
            "ram_bytes": _meminfo("MemTotal"),
            "ram_available_bytes": _meminfo("MemAvailable"),
            "dev_shm_bytes": st.f_blocks * st.f_frsize,
            "dev_shm_free_bytes": st.f_bavail * st.f_frsize,
            "page_size": os.sysconf("SC_PAGE_SIZE"),
            "kernel": platform.release(),
            "os": platform.platform(terse=True),
        },
        "versions": versions,
        "conditions": {
            "mode": "quick" if quick else "full",
            "groups": groups,
            "loadavg_start": list(os.getloadavg()),
            "git": _git(),
            "command": " ".join(["python", "-m", "benchmarks", *sys.argv[1:]]),
            "start_method": "spawn",
        },
    }


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 30):.1f} GiB"


def render(env: dict[str, Any]) -> str:
    """The environment as a few markdown lines."""
    m, v, c = env["machine"], env["versions"], env["conditions"]
    load = c["loadavg_start"]
    load_txt = f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    if "loadavg_end" in c:
        e = c["loadavg_end"]
        load_txt += f" at start, {e[0]:.2f} / {e[1]:.2f} / {e[2]:.2f} at end"
    peers = ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)
    missing = ", ".join(k for k, val in v.items() if val is None)
    lines = [
        f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"RAM {_gib(m['ram_bytes'])} ({_gib(m['ram_available_bytes'])} available), "
        f"/dev/shm {_gib(m['dev_shm_bytes'])} ({_gib(m['dev_shm_free_bytes'])} free), "
        f"{m['page_size'] // 1024} KiB pages, kernel {m['kernel']}",
        f"- **Versions:** {peers}" + (f"; not installed: {missing}" if missing else ""),
        f"- **Conditions:** {c['mode']} run, load average (1/5/15 min) {load_txt}, "
        f"shmarray at {c['git'] or 'unknown commit'}, worker processes started with "
        f"'{c['start_method']}', {env['date']}",
        f"- **Command:** `{c['command']}`",
    ]
    return "\n".join(lines)
