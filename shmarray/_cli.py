"""The ``shmarray`` command: ls, info, rm, gc, doctor, demo."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Sequence

from ._admin import collect, unlink_key
from ._display import human as _human
from ._errors import NotFoundError, ShmError
from ._inspect import describe_payload, ls, segment_info

__all__ = ["main", "describe_payload"]


def _cmd_ls(args: argparse.Namespace) -> int:
    entries = ls(args.pattern, include_foreign=args.all, dir=args.dir)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
    else:
        print(entries.to_text())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info = segment_info(None if args.native else args.key, native_key=args.key if args.native else None,
                        dir=args.dir)
    row = info.as_dict()
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    row["size"] = f"{info.size} ({_human(info.size)})"
    if row["created"] is not None:
        row["created"] = datetime.datetime.fromtimestamp(info.created).isoformat(timespec="seconds")
    for k, v in row.items():
        print(f"{k:12} {'-' if v is None else v}")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    # Every key is tried: one that is missing does not keep the others.
    failed = 0
    for key in args.keys:
        try:
            if args.native:
                unlink_key(native_key=key, dir=args.dir)
            else:
                unlink_key(key, dir=args.dir)
        except NotFoundError as e:
            print(f"shmarray: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"removed {key}")
    return 1 if failed else 0


def _cmd_gc(args: argparse.Namespace) -> int:
    # Keys, as `rm` and `ls` name segments; an owner file of kept memory frees nothing and is not news.
    removed = [r for r in collect(dir=args.dir) if r.what != "kept" or r.size]
    for r in removed:
        print(f"removed {r.label()}  {_human(r.size)}")
    n = len(removed)
    if n:
        print(f"{n} removed, {_human(sum(r.size for r in removed))} freed")
    else:
        print("nothing to remove: every segment has a live user or is persistent (`shmarray ls` lists them)")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import doctor

    report = doctor(args.dir)
    print(report.to_json() if args.json else report.to_text())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(args)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="shmarray", description="Inspect and manage shmarray segments.",
                                epilog="`shmarray COMMAND -h` shows a command's options; "
                                       "`shmarray demo --quick` shows what shmarray is for.")
    p.add_argument("--version", action="version", version=f"shmarray {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")  # none: the help (main)
    # --dir on every command, after the command name (shmarray ls --dir /mnt/huge).
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", metavar="DIR", default=None,
                       help="the segment directory (default: $SHMARRAY_DIR, else /dev/shm)")
    lister = sub.add_parser("ls", help="list segments (what dead processes left shows as orphans; "
                            "ls never frees anything: gc does)", parents=[where])
    lister.add_argument("pattern", nargs="?", metavar="PATTERN",
                        help="only keys that match this shell pattern (quote it: 'frames-*')")
    lister.add_argument("--all", action="store_true", help="also list objects that are not shmarray segments")
    lister.add_argument("--json", action="store_true", help="print JSON")
    lister.set_defaults(func=_cmd_ls)
    info = sub.add_parser("info", help="show one segment", parents=[where])
    info.add_argument("key")
    info.add_argument("--native", action="store_true", help="KEY is a native (OS) name")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    rm = sub.add_parser("rm", help="remove segments now (attached users keep their memory)", parents=[where])
    rm.add_argument("keys", nargs="+", metavar="KEY")
    rm.add_argument("--native", action="store_true", help="KEYs are native (OS) names")
    rm.set_defaults(func=_cmd_rm)
    gc = sub.add_parser("gc", help="remove what dead processes left: segments nobody is attached to "
                        "(not persistent ones), kept memory; prints each key and size",
                        parents=[where])
    gc.set_defaults(func=_cmd_gc)
    doc = sub.add_parser("doctor", help="what limits shared memory here, and how to fix it", parents=[where])
    doc.add_argument("--json", action="store_true", help="print JSON")
    doc.set_defaults(func=_cmd_doctor)
    demo = sub.add_parser("demo", help="run the demo: a pool of workers computes on one shared array, "
                          "zero-copy, next to the same job done by pickling", parents=[where])
    from ._demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shmarray`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `shmarray`: what a new user wants is the list of commands
        parser.print_help()
        return 0
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return status
    except ShmError as e:
        print(f"shmarray: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shmarray: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `shmarray ls --json | head`: the reader left, which is no error of ours.
        # Point stdout at /dev/null so that the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
