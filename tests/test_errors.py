"""The exception tree: codes, built-in bases, pickling, messages."""

from __future__ import annotations

import pickle

import pytest

import shmarray
from shmarray import SharedMemoryError as E

TABLE = [
    (shmarray.PermissionDeniedError, E.PermissionDenied, PermissionError),
    (shmarray.InvalidSizeError, E.InvalidSize, ValueError),
    (shmarray.InvalidKeyError, E.KeyError, ValueError),
    (shmarray.AlreadyExistsError, E.AlreadyExists, FileExistsError),
    (shmarray.NotFoundError, E.NotFound, FileNotFoundError),
    (shmarray.LockError, E.LockError, shmarray.ShmError),
    (shmarray.OutOfResourcesError, E.OutOfResources, MemoryError),
    (shmarray.OutOfResourcesError, E.OutOfResources, OSError),
]


@pytest.mark.parametrize(("cls", "code", "builtin"), TABLE)
def test_codes_and_builtin_bases(cls, code, builtin):
    err = cls("segment 'k' went wrong", "k")
    assert isinstance(err, shmarray.ShmError)
    assert isinstance(err, builtin)
    assert err.code is code
    assert err.key == "k"
    assert str(err) == "segment 'k' went wrong"


@pytest.mark.parametrize(("cls", "code", "builtin"), TABLE)
def test_errors_pickle(cls, code, builtin):
    err = pickle.loads(pickle.dumps(cls("msg about 'k'", "k")))
    assert type(err) is cls and err.code is code and err.key == "k" and str(err) == "msg about 'k'"


def test_enums_have_qt_values():
    assert [(m.name, int(m)) for m in E] == [
        ("NoError", 0), ("PermissionDenied", 1), ("InvalidSize", 2), ("KeyError", 3),
        ("AlreadyExists", 4), ("NotFound", 5), ("LockError", 6), ("OutOfResources", 7),
        ("UnknownError", 8),
    ]
    assert int(shmarray.AccessMode.ReadOnly) == 0 and int(shmarray.AccessMode.ReadWrite) == 1


def test_public_names_say_shmarray():
    assert repr(shmarray.Segment).startswith("<class 'shmarray.Segment'")
    assert shmarray.NotFoundError.__module__ == "shmarray"
