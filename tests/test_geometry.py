"""Properties of the patch geometry (hypothesis): coverage, bounds, padding, blending."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loaders.geometry import (
    PAD_MODES,
    PatchGrid,
    axis_starts,
    blend_weights,
    clip_window,
    padded_indices,
    take_window,
)
from loaders.sampling import ForegroundSampler
from loaders.stitching import Aggregator


@st.composite
def axis_case(draw):
    size = draw(st.integers(1, 40))
    patch = draw(st.integers(1, 24))
    stride = draw(st.integers(1, patch))
    pad = draw(st.integers(0, patch - 1))
    return size, patch, stride, pad


@settings(max_examples=300, deadline=None)
@given(axis_case())
def test_axis_grid_covers_every_voxel_and_stays_in_padded_bounds(case):
    size, patch, stride, pad = case
    starts = axis_starts(size, patch, stride, pad)
    covered = np.zeros(size, dtype=bool)
    end = max(size + pad, patch - pad)
    for s in starts:
        assert -pad <= s and s + patch <= end, (s, case)
        assert s < size and s + patch > 0, "every patch holds at least one real voxel"
        covered[max(s, 0) : min(s + patch, size)] = True
    assert covered.all()
    assert list(starts) == sorted(set(starts)), "strictly increasing, no duplicates"
    assert starts[-1] == end - patch, "the last patch snaps to the end"


def test_grid_refuses_what_would_skip_voxels():
    with pytest.raises(ValueError, match="IMG_STRIDE"):
        axis_starts(10, 4, 5)
    with pytest.raises(ValueError, match="IMG_PAD_SIZE"):
        axis_starts(10, 4, 2, pad=4)


@settings(max_examples=60, deadline=None)
@given(st.lists(axis_case(), min_size=3, max_size=3))
def test_3d_grid_covers_every_voxel(cases):
    shape = tuple(c[0] for c in cases)
    grid = PatchGrid.build(shape, [c[1] for c in cases], [c[2] for c in cases], [c[3] for c in cases])
    count = np.zeros(shape, dtype=np.int32)
    windows = list(grid.windows())
    assert len(windows) == len(grid)
    for window in windows:
        vol, local = clip_window(window, shape)
        assert all(0 <= s.start < s.stop <= n for s, n in zip(vol, shape, strict=True))
        assert all(0 <= s.start < s.stop <= p for s, p in zip(local, grid.patch, strict=True))
        count[vol] += 1
    assert (count > 0).all()


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 12),
    start=st.integers(-30, 11),
    length=st.integers(1, 30),
    mode=st.sampled_from(PAD_MODES),
)
def test_padded_window_equals_numpy_pad(size, start, length, mode):
    """A window read through padded_indices equals the same window of np.pad(volume)."""
    stop = start + length
    if (stop <= 0 and mode == "constant") or (start >= size and mode == "constant"):
        return  # entirely padding: refused by design
    volume = np.arange(1, size + 1, dtype=np.int64)[:, None] * 10 + np.arange(2)  # (size, 2)
    pad_before, pad_after = max(0, -start), max(0, stop - size)
    padded = np.pad(volume, ((pad_before, pad_after), (0, 0)), mode=mode)
    expected = padded[start + pad_before : stop + pad_before]
    read = padded_indices(start, stop, size, mode)
    assert 0 <= read.lo < read.hi <= size
    got = take_window(volume[read.lo : read.hi].copy(), [read])
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=3), st.sampled_from(["average", "gaussian"]))
def test_blend_weights_positive_and_peak_one(patch, mode):
    w = blend_weights(patch, mode)
    assert w.shape == tuple(patch)
    assert (w > 0).all() and np.isclose(w.max(), 1.0)
    # symmetric about the centre on every axis
    for axis in range(len(patch)):
        np.testing.assert_allclose(w, np.flip(w, axis=axis))


@settings(max_examples=40, deadline=None)
@given(st.lists(axis_case(), min_size=3, max_size=3), st.sampled_from(["average", "gaussian"]))
def test_stitching_a_pointwise_function_is_exact(cases, mode):
    shape = tuple(c[0] for c in cases)
    grid = PatchGrid.build(shape, [c[1] for c in cases], [c[2] for c in cases], [c[3] for c in cases])
    rng = np.random.default_rng(0)
    volume = rng.normal(size=shape).astype(np.float32)
    padded_volume = np.pad(
        volume,
        [(p, max(p, q - n - p) + 1) for n, q, p in zip(shape, grid.patch, grid.pad, strict=True)],
        mode="edge",
    )
    truth = np.stack([volume * 3 - 1, volume * volume], axis=-1)
    agg = Aggregator(shape, 2)
    weights = blend_weights(grid.patch, mode)
    for window in grid.windows():
        pad = grid.pad
        patch = padded_volume[tuple(slice(a + p, b + p) for (a, b), p in zip(window, pad, strict=True))]
        agg.add(window, np.stack([patch * 3 - 1, patch * patch], axis=-1), weights)
    assert agg.covered().all()
    np.testing.assert_array_equal(agg.result(), truth)


@settings(max_examples=200, deadline=None)
@given(st.lists(axis_case(), min_size=3, max_size=3), st.integers(0, 2**31 - 1), st.data())
def test_random_patches_stay_in_padded_bounds_and_hold_their_centre(cases, seed, data):
    shape = tuple(c[0] for c in cases)
    patch = tuple(c[1] for c in cases)
    pad = tuple(c[3] for c in cases)
    sampler = ForegroundSampler(patch, pad, 0.5, seed)  # type: ignore[arg-type]
    centre = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    rng = np.random.default_rng(seed)
    for window in (sampler.window_around(centre, shape), sampler.random_window(rng, shape)):
        for (a, b), n, p, q in zip(window, shape, patch, pad, strict=True):
            assert b - a == p
            assert -q <= a and b <= max(n + q, p - q)
            assert a < n and b > 0
    around = sampler.window_around(centre, shape)
    assert all(a <= c < b for (a, b), c in zip(around, centre, strict=True))


def test_a_window_wholly_outside_the_axis_names_the_axis_and_the_pad_mode():
    with pytest.raises(
        ValueError,
        match=r"window \[12, 15\) lies wholly outside an axis of 10 voxels: with IMG_PAD_MODE='constant'",
    ):
        padded_indices(12, 15, 10, "constant")
    assert padded_indices(12, 15, 10, "edge").take == (0, 0, 0)  # other modes repeat the scan's voxels
