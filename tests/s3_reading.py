"""Reading an S3 store without scancache, as docs/store-format.md says a plain reader does:
list the pointers under ``.current/``, read one, open ``.scan-versions/<scan>/<version>`` with
zarr-python (through fsspec's s3fs)."""

from __future__ import annotations

import json
import os

import numpy as np
import zarr
from h5_sources import reference


def _split(url):
    bucket, _, prefix = url[len("s3://") :].partition("/")
    return bucket, prefix.strip("/")


def _client():
    import boto3

    return boto3.client("s3")  # endpoint and keys from the AWS_* environment


def _options():
    return {
        "endpoint_url": os.environ["AWS_ENDPOINT_URL"],
        "key": os.environ["AWS_ACCESS_KEY_ID"],
        "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
    }


def published_s3(url):
    """The scans a plain reader finds: one pointer object per scan under ``.current/``."""
    bucket, prefix = _split(url)
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/.current/")
    return sorted(item["Key"].rsplit("/", 1)[1] for page in pages for item in page.get("Contents", []))


def current_version(url, scan_id):
    bucket, prefix = _split(url)
    body = _client().get_object(Bucket=bucket, Key=f"{prefix}/.current/{scan_id}")["Body"].read()
    return json.loads(body)["version"]


def open_scan_group(url, scan_id):
    version = current_version(url, scan_id)
    return zarr.open_group(f"{url}/.scan-versions/{scan_id}/{version}", mode="r", storage_options=_options())


def read_store_s3(url):
    """{scan_id: (attrs, image, mask or None)} read with plain zarr-python."""
    root = zarr.open_group(url, mode="r", storage_options=_options())
    assert root.attrs["scancache"]["format"] == 2
    out = {}
    for name in published_s3(url):
        scan = open_scan_group(url, name)
        image = scan["image"][...]
        mask = scan["mask"][...] if scan.attrs["num_classes"] else None
        out[name] = (dict(scan.attrs), image, mask)
    return out


def assert_s3_store_matches(url, source, only=None):
    truth = reference(source, only)
    stored = read_store_s3(url)
    keys = set(only) if only is not None else set(truth)
    assert keys <= set(stored), f"missing from store: {sorted(keys - set(stored))}"
    for key in keys:
        split, image, mask = truth[key]
        attrs, got_image, got_mask = stored[key]
        np.testing.assert_array_equal(got_image, image)
        assert got_image.dtype == image.dtype.newbyteorder("=")
        if mask is None:
            assert got_mask is None
        else:
            np.testing.assert_array_equal(got_mask, mask)
        assert attrs["split"] == split
    return truth, stored
