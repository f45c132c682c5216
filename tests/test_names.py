"""Key -> native key derivation and key checks."""

from __future__ import annotations

import os
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmarray
from shmarray._os import check_key, check_native_key, native_key_for


@given(st.text(min_size=1, max_size=1024).filter(lambda k: "\0" not in k))
@settings(max_examples=300, deadline=None)
def test_native_key_is_valid_and_deterministic(k):
    name = native_key_for(k)
    assert name == native_key_for(k)
    assert name.startswith("shmarray_")
    assert "/" not in name and "\0" not in name
    assert len(name.encode()) <= 255
    assert set(name) <= set(string.ascii_letters + string.digits + "_.-")


def test_native_key_is_readable_and_hashes_the_whole_key():
    a = native_key_for("frames")
    assert a.startswith("shmarray_frames_")
    long1 = "x" * 500 + "a"
    long2 = "x" * 500 + "b"
    assert native_key_for(long1) != native_key_for(long2)
    assert native_key_for("a/b") != native_key_for("ab")
    assert native_key_for("é") != native_key_for("e")


@pytest.mark.parametrize("bad", ["", "x" * 1025, "a\0b"])
def test_bad_keys_are_invalid_key_errors(bad):
    with pytest.raises(shmarray.InvalidKeyError) as info:
        shmarray.Segment(bad)
    assert info.value.code == shmarray.SharedMemoryError.KeyError


@pytest.mark.parametrize("bad", [1, b"bytes", 3.5, ["k"]])
def test_non_str_keys(bad):
    with pytest.raises(shmarray.InvalidKeyError):
        shmarray.Segment(bad)
    with pytest.raises(TypeError):
        shmarray.Segment(bad)


def test_max_length_key_works(key):
    k = key + "y" * (1024 - len(key))
    assert check_key(k) == k
    seg = shmarray.Segment(k).create(16)
    try:
        assert shmarray.segment_info(k).key == k
    finally:
        seg.detach()


@pytest.mark.parametrize("bad", ["", "/", "a/b", "/a/b", "x" * 300])
def test_bad_native_keys(bad):
    with pytest.raises(shmarray.InvalidKeyError):
        check_native_key(bad)


def test_native_key_leading_slash_is_optional():
    assert check_native_key("/psm_abc") == "psm_abc" == check_native_key("psm_abc")


def test_bad_keys_touch_nothing():
    def mine() -> set[str]:  # this process's names only: others may be making segments meanwhile
        return {n for n in os.listdir("/dev/shm") if f"-{os.getpid()}-" in n or n.startswith(("shmarray_x", "shmarray_a"))}

    before = mine()
    for bad in ["", "x" * 2000, "a\0"]:
        with pytest.raises(shmarray.InvalidKeyError):
            shmarray.Segment(bad).create(10)
    assert mine() == before
