"""shmarray.ls() and the rich (HTML) displays of Segment, SharedArray and the listing."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re

import numpy as np
import pytest

import shmarray
from shmarray import Segment
from shmarray._cli import main

from conftest import SHM

from _procs import start

NASTY = "<script>alert('x')</script>&\"q\""


def _hold(key: str, ready, release, lock: bool) -> int:
    """In a child: attach *key* (taking the lock if asked), say so, wait to be released."""
    seg = Segment(key).attach()
    if lock:
        seg.lock()
    ready.set()
    release.wait(30)
    seg.detach()
    return os.getpid()


def _no_raw_markup(html: str) -> None:
    """No user text got through unescaped: every tag in *html* is one of ours."""
    tags = set(re.findall(r"</?([a-zA-Z]+)", html))
    assert tags <= {"div", "b", "table", "tr", "th", "td", "thead", "tbody", "caption", "pre", "p"}, tags


# -- ls() ----------------------------------------------------------------------------


def test_ls_lists_arrays_tables_rings_and_raw_segments(make_key):
    pa = pytest.importorskip("pyarrow")
    prefix = make_key("ls")
    a = shmarray.create(f"{prefix}-arr", (10, 3), np.float32, persistent=True)
    t = shmarray.share_table(f"{prefix}-tab", pa.table({"x": [1, 2, 3], "s": ["a", "b", "c"]}))
    r = shmarray.BatchRing.create(f"{prefix}-ring", {"img": ((2, 4), np.uint8)}, slots=2)
    raw = Segment(f"{prefix}-raw").create(100)
    try:
        listing = shmarray.ls(f"{prefix}-*")
        assert isinstance(listing, shmarray.Listing) and isinstance(listing, list)
        assert listing.keys() == sorted(listing.keys(), key=lambda k: shmarray._os.native_key_for(k))
        by_key = {e.key: e for e in listing}
        assert set(by_key) == {f"{prefix}-{k}" for k in ("arr", "tab", "ring", "raw")}
        arr = by_key[f"{prefix}-arr"]
        assert isinstance(arr, shmarray.SegmentEntry)
        assert (arr.kind, arr.payload) == ("ndarray", "ndarray float32 (10, 3) C")
        assert arr.persistent and not arr.orphan and arr.pids == (os.getpid(),) and arr.processes == 1
        tab = by_key[f"{prefix}-tab"]
        assert tab.kind == "arrow table"
        assert tab.payload.startswith("arrow table, 3 rows x 2 columns: x: int64")
        ring = by_key[f"{prefix}-ring"]
        assert ring.kind == "batch ring" and ring.payload == "batch ring, 2 slots of img: uint8 (2, 4)"
        assert by_key[f"{prefix}-raw"].kind == "raw"
        assert shmarray.ls(f"{prefix}-ar?")[0].key == f"{prefix}-arr"
        assert shmarray.ls(f"{prefix}-nothing*") == []
    finally:
        a.close()
        raw.detach()
        r.close()
        del t
        shmarray.unlink(f"{prefix}-arr")


def test_ls_and_the_cli_share_one_code_path(key, capsys):
    a = shmarray.share(key, np.arange(6, dtype=">i2").reshape(2, 3))
    entry = shmarray.ls(key)[0]
    assert main(["ls", key, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [json.loads(json.dumps(entry.as_dict()))]
    assert rows[0]["payload"] == "ndarray >i2 (2, 3) C" and rows[0]["processes"] == 1
    assert main(["ls", key]) == 0
    assert capsys.readouterr().out.strip() == shmarray.ls(key).to_text() == repr(shmarray.ls(key))
    assert main(["ls", key + "-none"]) == 0
    assert capsys.readouterr().out.strip() == f"no shmarray segments match {key + '-none'!r}"
    assert shmarray.Listing().to_text() == f"no shmarray segments in {SHM}"
    del a


def test_ls_bad_pattern():
    with pytest.raises(TypeError, match="pattern must be a str"):
        shmarray.ls(3)  # type: ignore[arg-type]


def test_entries_make_a_dataframe(key):
    pd = pytest.importorskip("pandas")
    a = shmarray.create(key, (4,), np.int64)
    df = pd.DataFrame(shmarray.ls(key))
    assert list(df["key"]) == [key] and df.loc[0, "payload"] == "ndarray int64 (4,) C"
    del a


def test_plain_reprs_stay_short(key):
    a = shmarray.create(key, (1000, 1000), np.uint8)
    for text in (repr(shmarray.ls(key)[0]), repr(a.segment)):
        assert "\n" not in text and len(text) < 200, text
    text = repr(shmarray.ls(key)[0])
    assert text.startswith(f"<shmarray segment {key!r}: 976.") and text.endswith(
        " KiB, ndarray uint8 (1000, 1000) C, 1 attached>"), text
    del a


# -- HTML --------------------------------------------------------------------------------


def test_html_escapes_keys_everywhere():
    key = f"{NASTY}-{os.getpid()}"
    a = shmarray.create(key, (3,), np.dtype([("<b>bold</b>", "<f4")]))
    try:
        for html in (shmarray.ls(f"*{os.getpid()}")._repr_html_(), shmarray.ls(key)[0]._repr_html_(),
                     a.segment._repr_html_(), a._repr_html_()):
            assert "<script>" not in html and "&lt;script&gt;" in html
            _no_raw_markup(html)
        assert "&lt;b&gt;bold&lt;/b&gt;" in a._repr_html_()
    finally:
        a.close()


def test_segment_html_shows_processes_lock_and_persistence(key):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    seg = Segment(key).create(4096, persistent=True)
    child = start(_hold, key, ready, release, True)
    try:
        assert ready.wait(30)
        html = seg._repr_html_()
        assert f"2 processes: {min(os.getpid(), child.pid)}" in html
        assert f"{os.getpid()} (this process)" in html and str(child.pid) in html
        assert f"exclusive, held by pid {child.pid}" in html
        assert "persistent</th><td style=\"text-align:left\">yes" in html
        entry = shmarray.ls(key)[0]
        assert entry.lock == "exclusive" and entry.lock_holder == child.pid
        assert f"exclusive (pid {child.pid})" in entry._repr_html_()
        assert f"pids {min(os.getpid(), child.pid)}, {max(os.getpid(), child.pid)}" in entry._repr_html_()
    finally:
        release.set()
        assert child.result(30) == child.pid
    with seg.locked(shared=True):
        assert "shared, held by this object" in seg._repr_html_()
    assert "free" in seg._repr_html_() and "1 process:" in seg._repr_html_()
    seg.detach()
    assert "detached" in seg._repr_html_()
    shmarray.unlink(key)


def test_sharedarray_html(key):
    a = shmarray.share(key, np.asfortranarray(np.arange(12.0).reshape(3, 4)))
    html = a._repr_html_()
    assert html is not None
    for text in ("shmarray.SharedArray", f"&#x27;{key}&#x27;", "float64", "(3, 4)", ">F<",
                 "96 B (96 bytes)", "ReadWrite", "no: goes with its last user", "free", "<pre>"):
        assert text in html, text
    assert "strided view" in a[:, ::2]._repr_html_()
    r = shmarray.attach(key, readonly=True)
    assert "no (read-only)" in r._repr_html_() and "1 process:" in r._repr_html_()
    with a.lock():
        assert "exclusive, held by this object" in a._repr_html_()
        assert "exclusive, held by pid" in r._repr_html_()
    # Outside any segment: no HTML, so IPython falls back to the plain repr.
    assert np.asarray(a).view(shmarray.SharedArray)._repr_html_() is None
    a.close()
    assert "detached" in a._repr_html_()  # still readable: the mapping lives with the array
    del r


def test_large_array_preview_is_summarised(key):
    a = shmarray.create(key, (2000, 2000), np.float32, fill=1.5)
    html = a._repr_html_()
    assert "..." in html and len(html) < 4000
    del a
