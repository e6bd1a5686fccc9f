"""Properties of the pure pieces every other part relies on: ROI parsing, categories, the wire."""

import itertools
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.wire import decode_npy, decode_npy_stream, encode_npy
from store.categories import merge_mask, normalize_categories
from store.errors import InvalidCategories, InvalidParameter, InvalidROI
from store.roi import format_roi, parse_roi, region_shape

shapes = st.lists(st.integers(1, 12), min_size=1, max_size=4).map(tuple)


@st.composite
def shape_and_roi(draw):
    """A shape and a roi text in any accepted spelling, with the numpy slices it means."""
    shape = draw(shapes)
    n_axes = draw(st.integers(0, len(shape)))
    parts, slices = [], []
    for size in shape[:n_axes]:
        kind = draw(st.sampled_from(["range", "open_lo", "open_hi", "all", "index", "neg"]))
        a = draw(st.integers(0, size - 1))
        b = draw(st.integers(a + 1, size))
        if kind == "range":
            parts.append(f"{a}:{b}")
            slices.append(slice(a, b))
        elif kind == "open_lo":
            parts.append(f":{b}")
            slices.append(slice(0, b))
        elif kind == "open_hi":
            parts.append(f"{a}:")
            slices.append(slice(a, size))
        elif kind == "all":
            parts.append(":")
            slices.append(slice(0, size))
        elif kind == "index":
            parts.append(str(a))
            slices.append(slice(a, a + 1))
        else:
            parts.append(f"{a - size}:{b - size if b < size else ''}")
            slices.append(slice(a, b))
    slices += [slice(0, n) for n in shape[n_axes:]]
    return shape, ",".join(parts), tuple(slices)


@given(shape_and_roi())
def test_parse_roi_means_numpy_slicing(case):
    shape, text, expected = case
    arr = np.arange(int(np.prod(shape))).reshape(shape)
    region = parse_roi(text, shape)
    np.testing.assert_array_equal(arr[region], arr[expected])
    assert region_shape(region) == arr[expected].shape
    assert all(0 <= s.start < s.stop <= n for s, n in zip(region, shape, strict=True))
    assert parse_roi(format_roi(region), shape) == region


@pytest.mark.parametrize(
    "text",
    ["0:100", "5:2", "3:3", "x", "1:2:1", "0:1,0:1,0:1,0:1,0:1", "-100:", "12", "a:b", "1,,2", " "],
)
def test_bad_roi_names_the_parameter(text):
    with pytest.raises(InvalidROI) as info:
        parse_roi(text, (10, 10, 10))
    assert str(info.value).startswith("roi:")
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidParameter)


masks = st.integers(1, 5).flatmap(
    lambda c: st.tuples(
        st.just(c),
        st.lists(st.integers(-1, c - 1), min_size=8, max_size=8),
    )
)


@given(masks, st.data(), st.booleans())
def test_merge_mask_is_medsegpy_collect_mask(case, data, background):
    num_classes, labels = case
    labels = np.array(labels).reshape(2, 2, 2)
    mask = np.stack([labels == k for k in range(num_classes)], -1).astype(np.uint8)
    # Each class at most once in all (one channel a class): a permutation cut into groups.
    classes = data.draw(st.permutations(range(num_classes)))[: data.draw(st.integers(1, num_classes))]
    cuts = (
        sorted(data.draw(st.sets(st.integers(1, len(classes) - 1), max_size=3))) if len(classes) > 1 else []
    )
    bounds = [0, *cuts, len(classes)]
    groups = [
        classes[a] if b - a == 1 and data.draw(st.booleans()) else list(classes[a:b])
        for a, b in itertools.pairwise(bounds)
    ]
    cats = normalize_categories(json.dumps(groups), num_classes)
    out = merge_mask(mask, cats, background)
    ref = [mask[..., g] if isinstance(g, int) else mask[..., g].sum(-1) for g in groups]
    if background:
        ref.insert(0, (np.stack(ref, -1).sum(-1) == 0))
    np.testing.assert_array_equal(out, np.stack(ref, -1).astype(np.uint8))
    assert out.dtype == np.uint8


@pytest.mark.parametrize("value", ["[", "[]", "[7]", "[[]]", "[true]", "[0.5]", '"a"', "{}", "[-1]"])
def test_bad_categories(value):
    with pytest.raises(InvalidCategories) as info:
        normalize_categories(value, 4)
    assert str(info.value).startswith("categories:")


dtypes = st.sampled_from([np.uint8, np.int16, np.float32, np.float64, np.uint16, np.int32])


@given(st.lists(st.tuples(shapes, dtypes), min_size=1, max_size=5))
def test_npy_stream_round_trip(items):
    arrays = [np.arange(int(np.prod(s)), dtype=d).reshape(s) for s, d in items]
    payload = b"".join(encode_npy(a) for a in arrays)
    back = decode_npy_stream(payload)
    assert len(back) == len(arrays)
    for a, b in zip(arrays, back, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(decode_npy(encode_npy(arrays[0])), arrays[0])


def test_npy_stream_rejects_truncation():
    payload = encode_npy(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError):
        decode_npy_stream(payload[:-3])
    with pytest.raises(ValueError):
        decode_npy_stream(b"garbage!!!!!")


@pytest.mark.parametrize(
    "value",
    ['["b",["a","d"]]', "b,a+d", ("b", ("a", 3)), ["b", [0, "d"]], "1,0+3", [1, [0, 3]]],
)
def test_categories_by_name_resolve_to_indices(value):
    assert normalize_categories(value, 4, ["a", "b", "c", "d"]) == ((1,), (0, 3))


def test_overlapping_regions_are_categories_of_their_own():
    """BraTS' regions: whole tumour (1+2+4), tumour core (1+4), enhancing (4), here classes
    0, 1, 2 of the mask: a class in several categories, each category its own channel."""
    regions = normalize_categories("a+b+c,a+c,c", 3, ["a", "b", "c"])
    assert regions == ((0, 1, 2), (0, 2), (2,))
    assert normalize_categories([[0, 1], [1, 0, 2]], 3) == ((0, 1), (1, 0, 2))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ('["x"]', "no class named 'x'; the classes are 'a', 'b', 'c', 'd'"),
        ("a,0", "categories 0 and 1 select the same classes ('a' and 0): one channel for both"),
        ("a,a", "categories 0 and 1 select the same classes ('a' and 'a')"),
        ("a+0", "class 0 and class 'a' are the same class: each class may appear once in a category"),
        ("a+b+a", "class 'a' appears twice in one category"),
        ("a+,b", "is neither a JSON list"),
    ],
)
def test_bad_category_names(value, words):
    with pytest.raises(InvalidCategories) as info:
        normalize_categories(value, 4, ["a", "b", "c", "d"])
    assert str(info.value).startswith("categories:") and words in str(info.value)
