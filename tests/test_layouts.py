"""``scancache preprocess --layout``: presets resolve to chunk shapes, and every preset reads
back exactly (image, merged mask through the label map, locations)."""

from __future__ import annotations

import numpy as np
import pytest

from service.cli import main
from service.layouts import LAYOUTS, chunks_text
from store.format import ChunkLayout
from store.source import LocalSource
from store.writer import write_scan
from tests.conftest import make_volume


def test_presets_and_explicit_chunks():
    assert chunks_text(None, None) == "64,64,8"
    assert chunks_text("balanced", None) == "64,64,2"
    assert chunks_text(None, "8,8,2") == "8,8,2"
    with pytest.raises(ValueError, match="not both"):
        chunks_text("slices", "8,8,2")


def test_layout_and_chunks_together_is_one_line(tmp_path, capsys):
    argv = ["preprocess", str(tmp_path), str(tmp_path / "store"), "--layout", "slices", "--chunks", "8,8,1"]
    assert main(argv) == 1
    assert capsys.readouterr().err == "scancache preprocess: error: give --layout or --chunks, not both\n"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_preset_reads_back_exactly(tmp_path, name):
    image, mask = make_volume((70, 66, 9), 4, seed=1)
    layout = ChunkLayout.parse(LAYOUTS[name])
    write_scan(tmp_path / "store", "s", image, mask, {}, layout)
    src = LocalSource(tmp_path / "store", cache_bytes=0)
    assert src.metadata("s").attrs["layout"]["chunks"] == list(layout.chunks)
    np.testing.assert_array_equal(src.read_image("s", "3:60,:,2:7"), image[3:60, :, 2:7])
    merged = src.read_mask("s", ":,:,4", categories=[[0, 1], 3], background=True)
    m = mask[:, :, 4:5].astype(np.int64)
    want = np.stack([(m[..., [0, 1, 3]].sum(-1) == 0), m[..., 0] + m[..., 1], m[..., 3]], -1).astype(np.uint8)
    np.testing.assert_array_equal(merged, want)


def test_a_rerun_without_layout_flags_keeps_each_stored_scans_layout(tmp_path):
    """An upgrade that changes the default layout must not convert a whole store again: a run
    without layout flags skips stored scans in whatever layout they have, gives new scans the
    default, and converts again only when a layout is asked for."""
    import json

    from h5_sources import random_scan, run_cli, write_volume_file

    source, store = tmp_path / "src", tmp_path / "store"
    for k in (1, 2):
        write_volume_file(source / "train" / f"000000{k}_V00-Aug00.h5", *random_scan((16, 16, 4), 2, seed=k))

    def run(*flags):
        result = run_cli("preprocess", source, store, "--workers", "1", *flags)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def layouts():
        return {
            p.name: json.loads((p / "zarr.json").read_text())["attributes"]["layout"]["chunks"]
            for p in sorted(store.iterdir())
            if p.name.endswith("Aug00")
        }

    assert "2 converted, 0 skipped" in run("--chunks", "8,8,2")  # as an older default would have
    assert "0 converted, 2 skipped" in run()  # no flags: kept, not converted again
    write_volume_file(source / "train" / "0000003_V00-Aug00.h5", *random_scan((16, 16, 4), 2, seed=3))
    assert "1 converted, 2 skipped" in run()
    default = list(ChunkLayout().chunks)
    assert layouts() == {
        "0000001_V00-Aug00": [8, 8, 2],
        "0000002_V00-Aug00": [8, 8, 2],
        "0000003_V00-Aug00": default,
    }
    assert "1 converted, 2 skipped" in run("--chunks", "8,8,2")  # asked for: every scan's
    assert "3 converted, 0 skipped" in run("--chunks", "4,4,2")
    assert set(map(tuple, layouts().values())) == {(4, 4, 2)}
