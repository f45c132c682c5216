"""The ``shmarray`` command: ls, info, rm, gc, demo."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any, Sequence

from ._admin import SegmentInfo, collect_garbage, list_segments, read_head, segment_info, unlink_key
from ._errors import ShmError
from ._header import HEADER, Kind, describe_head, parse_header

__all__ = ["main", "describe_payload"]


def describe_payload(info: SegmentInfo) -> str:
    """What the segment holds, in a few words (the payload layers refine this)."""
    if not info.shmarray:
        return "foreign"
    head = _payload_head(info)
    if head.get("kind_id") == Kind.ARROW:
        return _describe_arrow(head)
    if head.get("kind_id") == Kind.NDARRAY:
        return _describe_array(head)
    if head.get("kind_id") == Kind.RING:
        from ._ringlayout import describe_descriptor as describe_ring

        return describe_ring(head.get("descriptor", b""), head.get("payload_length", 0))
    return "raw"


def _payload_head(info: SegmentInfo) -> dict[str, Any]:
    """The payload header of a segment, read without attaching: describe_head()'s dict."""
    try:
        hdr = parse_header(read_head(info.native_key, HEADER.size), info.size)
        head = read_head(info.native_key, hdr.descriptor_offset + hdr.descriptor_length)
    except (OSError, ShmError):  # no payload header, removed meanwhile, unreadable
        return {"kind": "raw"}
    return describe_head(head, info.size)


def _describe_arrow(head: dict[str, Any]) -> str:
    from ._arrow import describe_descriptor

    if not head.get("ready", True):
        return "arrow table (being written)"
    return describe_descriptor(head.get("descriptor", b""))


def _describe_array(head: dict[str, Any]) -> str:
    from ._array_format import describe_descriptor

    return describe_descriptor(head.get("descriptor", b""))  # 'ndarray float64 (1000, 480) C'


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def _row(info: SegmentInfo) -> dict[str, object]:
    return {
        "key": info.key,
        "native_key": info.native_key,
        "size": info.size,
        "payload": describe_payload(info),
        "processes": len(info.attached_pids),
        "attachments": info.attachments,
        "pids": list(info.attached_pids),
        "persistent": info.persistent,
        "orphan": info.orphan,
        "lock": info.lock,
        "lock_holder": info.lock_holder,
        "creator_pid": info.creator_pid,
        "created": info.created,
    }


def _table(rows: list[SegmentInfo]) -> str:
    head = ("KEY", "NATIVE NAME", "SIZE", "PAYLOAD", "PROCS", "PERSISTENT", "LOCK")
    lines = [head]
    for info in rows:
        lines.append((
            info.key if info.key is not None else "-",
            "/" + info.native_key,
            _size(info.size),
            describe_payload(info),
            f"{len(info.attached_pids)}" + (" (orphan: gc removes it)" if info.orphan else ""),
            "yes" if info.persistent else "no",
            info.lock or "-",
        ))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)


def _cmd_ls(args: argparse.Namespace) -> int:
    rows = list_segments(include_foreign=args.all)
    if args.json:
        print(json.dumps([_row(r) for r in rows], indent=2))
    elif rows:
        print(_table(rows))
    else:
        print("no shmarray segments in /dev/shm")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info = segment_info(None if args.native else args.key, native_key=args.key if args.native else None)
    row = _row(info)
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    row["size"] = f"{info.size} ({_size(info.size)})"
    if info.created:
        row["created"] = datetime.datetime.fromtimestamp(info.created).isoformat(timespec="seconds")
    for k, v in row.items():
        print(f"{k:12} {v}")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    for key in args.keys:
        if args.native:
            unlink_key(native_key=key)
        else:
            unlink_key(key)
        print(f"removed {key}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    removed = collect_garbage()
    for name in removed:
        print(f"removed /{name}")
    print(f"{len(removed)} segment(s) removed")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shmarray", description="Inspect and manage shmarray segments.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list segments")
    ls.add_argument("--all", action="store_true", help="also list objects that are not shmarray segments")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_cmd_ls)
    info = sub.add_parser("info", help="show one segment")
    info.add_argument("key")
    info.add_argument("--native", action="store_true", help="KEY is a native (OS) name")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    rm = sub.add_parser("rm", help="remove segments now (attached users keep their memory)")
    rm.add_argument("keys", nargs="+", metavar="KEY")
    rm.add_argument("--native", action="store_true", help="KEYs are native (OS) names")
    rm.set_defaults(func=_cmd_rm)
    gc = sub.add_parser("gc", help="remove segments nobody is attached to (not persistent ones)")
    gc.set_defaults(func=_cmd_gc)
    demo = sub.add_parser("demo", help="run the demo: a pool of workers computes on one shared array, "
                          "zero-copy, next to the same job done by pickling")
    from ._demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shmarray`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ShmError as e:
        print(f"shmarray: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shmarray: interrupted", file=sys.stderr)
        return 130
