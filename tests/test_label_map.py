"""``apply_table``: the word-gather merge equals ``merge_mask`` over the one-hot mask, exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.categories import all_categories, merge_mask
from store.label_map import apply_table, category_table


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The (..., C) mask a label map stands for: class k where the label is k + 1."""
    return (labels[..., None] == np.arange(1, num_classes + 1, dtype=np.uint8)).astype(np.uint8)


@st.composite
def cases(draw: st.DrawFn) -> tuple[np.ndarray, list[tuple[int, ...]] | None, bool, int]:
    num_classes = draw(st.integers(1, 12))
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**32 - 1))
    labels = np.random.default_rng(seed).integers(0, num_classes + 1, shape, dtype=np.uint8)
    groups = st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=4).map(tuple)
    categories = draw(st.none() | st.lists(groups, min_size=1, max_size=9))
    return labels, categories, draw(st.booleans()), num_classes


@settings(max_examples=300, deadline=None)
@given(cases())
def test_apply_table_equals_merge_mask(
    case: tuple[np.ndarray, list[tuple[int, ...]] | None, bool, int],
) -> None:
    labels, categories, background, num_classes = case
    expected = merge_mask(one_hot(labels, num_classes), categories, background)
    got = apply_table(labels, category_table(categories, background, num_classes))
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16])
def test_every_channel_count_on_a_slab(channels: int) -> None:
    # Word tables for 3, 5, 6, 7 channels; packed rows for 1, 2, 4, 8; the row gather beyond.
    rng = np.random.default_rng(channels)
    num_classes = 6
    table = rng.integers(0, 256, (num_classes + 1, channels), dtype=np.uint8)
    labels = rng.integers(0, num_classes + 1, (38, 38, 7), dtype=np.uint8)  # size not a multiple of 8
    expected = np.stack([table[labels, c] for c in range(channels)], axis=-1)
    np.testing.assert_array_equal(apply_table(labels, table), expected)
    strided = labels[:, ::2]  # a non-contiguous label map gives the same values
    np.testing.assert_array_equal(apply_table(strided, table), expected[:, ::2])


def test_default_categories_are_one_hot() -> None:
    labels = np.array([[0, 1, 2, 3]], np.uint8)
    got = apply_table(labels, category_table(None, True, 3))
    np.testing.assert_array_equal(got[0], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert category_table(None, False, 3).shape == (4, len(all_categories(3)))


def test_a_label_beyond_the_table_is_refused() -> None:
    labels = np.full((4, 4, 8), 9, np.uint8)
    with pytest.raises(ValueError, match="label 9"):
        apply_table(labels, category_table(None, True, 4))


def test_many_classes_fall_back_to_the_row_gather() -> None:
    # 3 channels span 4 voxels a word: 30 classes would need 31**4 entries per word table.
    labels = np.random.default_rng(0).integers(0, 31, (16, 16, 3), dtype=np.uint8)
    categories = [(0, 1), (2,), (29,)]
    expected = merge_mask(one_hot(labels, 30), categories, False)
    np.testing.assert_array_equal(apply_table(labels, category_table(categories, False, 30)), expected)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 300),
    channels=st.integers(1, 40),
    size=st.integers(1, 301),
    dtype=st.sampled_from([np.uint8, np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_float_tables_two_labels_at_a_time_equal_numpy(
    rows: int, channels: int, size: int, dtype: type, seed: int
) -> None:
    # float y (one-hot, class index) takes labels in pairs where the pair table fits
    # (PAIR_TABLE_MAX_BYTES, at most 256 rows), else the group or row gather: all equal numpy's
    # table[labels].
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 5, (rows, channels)).astype(dtype)
    labels = rng.integers(0, min(rows, 256), size, dtype=np.uint8)  # a table may have more rows than labels
    out = np.full((size, channels), 7, dtype)
    got = apply_table(labels, table, out=out)
    assert got is out
    np.testing.assert_array_equal(got, table[labels])
