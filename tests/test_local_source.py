import numpy as np
import pytest
import zarr

from store.errors import ArrayNotFound, InvalidPath, InvalidROI, ScanNotFound
from store.source import LocalSource


def test_zarr_python_reads_store_exactly(small_store):
    root, truth = small_store
    group = zarr.open_group(str(root), mode="r")
    for scan_id, (image, mask) in truth.items():
        np.testing.assert_array_equal(group[scan_id]["image"][...], image)
        assert group[scan_id]["image"].dtype == image.dtype
        if mask is not None:
            np.testing.assert_array_equal(group[scan_id]["mask"][...], mask)
        assert group[scan_id].attrs["shape"] == list(image.shape)


def test_local_source_reads_regions(small_store):
    root, truth = small_store
    src = LocalSource(root)
    assert [m.scan_id for m in src.list_scans()] == sorted(truth)
    image, mask = truth["0000001_V00-Aug00"]
    np.testing.assert_array_equal(src.read_image("0000001_V00-Aug00", "1:30,-10:,4"), image[1:30, -10:, 4:5])
    merged = src.read_mask("0000001_V00-Aug00", ":,:,2:5", categories=[0, [1, 2]], background=True)
    m = mask[:, :, 2:5]
    ref = np.stack([(m[..., :3].sum(-1) == 0), m[..., 0], m[..., 1] + m[..., 2]], -1).astype(np.uint8)
    np.testing.assert_array_equal(merged, ref)
    assert [m.scan_id for m in src.list_scans(split="train")] == ["0000001_V00-Aug00", "0000001_V01-Aug00"]
    with pytest.raises(ScanNotFound):
        src.metadata("0000009_V00-Aug00")
    with pytest.raises(KeyError):
        src.read_mask("0000003_V00-Aug01")
    with pytest.raises(ArrayNotFound):
        src.read_mask("0000003_V00-Aug01")
    with pytest.raises(InvalidPath):
        src.metadata("../etc")
    with pytest.raises(InvalidROI):
        src.read_image("0000001_V00-Aug00", "0:100")
