"""Every scancache error survives pickling as it was (type, message, attributes): one raised
in a torch DataLoader worker or a Dask worker reaches the training or job process pickled, and
the default (``cls(*args)`` with the message alone) fails for errors whose ``__init__`` takes
other arguments, replacing the one-line message with a TypeError."""

from __future__ import annotations

import inspect
import pickle

import pytest

import client.http_errors  # noqa: F401  (the error classes defined there)
import service.cluster_watch
import service.nnunet_dataset
import service.server.errors
import service.server.params  # noqa: F401
import store.format
import store.s3_errors
import store.units  # noqa: F401
from store.errors import ScanCacheError, SourceError, VersionGone


def _all_errors(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_errors(sub)]
    return found


def _example(cls: type) -> ScanCacheError:
    """An instance made with a made-up value for each required argument."""
    required = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self"
        and p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return cls(*(f"{p.name}-value" for p in required)) if required else cls("a message")


ERRORS = sorted({*_all_errors(ScanCacheError)}, key=lambda c: c.__qualname__)


def test_the_error_classes_were_found():
    names = {c.__name__ for c in ERRORS}
    assert {"VersionGone", "SourceError", "InvalidParameter", "ScanDamaged", "StoreUnavailable"} <= names


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_an_error_pickled_is_the_same_error(cls):
    error = _example(cls)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == str(error) and back.args == error.args
    assert back.__dict__ == error.__dict__


def test_attributes_come_back():
    gone = pickle.loads(pickle.dumps(VersionGone("0000001_V00", "3")))
    assert (gone.scan_id, gone.version) == ("0000001_V00", "3")
    bad = pickle.loads(pickle.dumps(SourceError("case_001", "case_001.nii.gz", "not a NIfTI file")))
    assert (bad.scan, bad.file, bad.why) == ("case_001", "case_001.nii.gz", "not a NIfTI file")
    assert str(bad) == "case_001: case_001.nii.gz: not a NIfTI file"
