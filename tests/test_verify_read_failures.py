"""verify reports only damage as TORN: stored files that cannot be read now (object storage
unavailable, credentials tensorstore could not make) are FAILED with what to do, never a
"convert again" for intact scans."""

from __future__ import annotations

import pytest
from h5_sources import run_cli

import service.verify
from service.sample_data import write_sample_data
from service.verify import FAILED, TORN, verify_store
from store.ts_status import is_passing, refused_read

CREDENTIALS = (
    'INTERNAL: Error opening "zarr3" driver: Failed to create credentials provideraws-c-common: '
    "AWS_ERROR_STRING_MATCH_NOT_FOUND"
)


def test_tensorstore_errors_are_classified():
    assert refused_read(ValueError(CREDENTIALS))
    assert refused_read(ValueError("PERMISSION_DENIED: AccessDenied"))
    assert not refused_read(ValueError("INTERNAL: something else"))
    assert is_passing(ValueError("UNAVAILABLE: 503 Slow Down"))
    assert not is_passing(ValueError("DATA_LOSS: checksum"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_fail")
    write_sample_data(root / "source", subjects=1, visits=2, shape=(12, 10, 4), num_classes=2, seed=1)
    result = run_cli("preprocess", root / "source", root / "store", "--workers", "1", "-q")
    assert result.returncode == 0, result.stderr
    return root / "source", root / "store"


@pytest.mark.parametrize(
    "error, status, said",
    [
        (ValueError(CREDENTIALS), FAILED, "check the store's permissions or credentials"),
        (
            ValueError("UNAVAILABLE: 503 Slow Down"),
            FAILED,
            "could not be read now (UNAVAILABLE: 503 Slow Down)",
        ),
        (ValueError("DATA_LOSS: shard index does not decode"), TORN, "unreadable: ValueError: DATA_LOSS"),
    ],
)
def test_a_read_that_fails_is_torn_only_when_it_is_damage(converted, monkeypatch, error, status, said):
    source, store = converted

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(service.verify, "_compare_arrays", failing)
    report = verify_store(source, store)
    assert [line.status for line in report.lines] == [status, status]
    assert all(said in line.detail for line in report.lines), [line.detail for line in report.lines]
