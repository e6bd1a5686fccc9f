"""Batch shapes when a loader's scans differ in shape (nnU-Net cases, a case whose axes were
permuted): which axes of x and y vary, for a ``tf.data`` spec and for Keras' own probe.

A slice loader with ``batch_size=1`` (or a test loader) gives each scan's whole slices, so x
and y differ in height and width from scan to scan. TensorFlow needs a spec whose varying axes
are ``None``: ``as_tf_dataset`` builds it from one example of a few scans chosen to differ on
every axis where any scan does, and Keras' ``fit``/``evaluate`` on the loader itself, which
builds its spec from the first two batches it reads, is given two such examples to read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _one_example(loader: Any, scan: Any) -> tuple[np.ndarray, np.ndarray] | None:
    elements = list(loader.inference_elements(scan))[:1]
    if not elements:
        return None
    x, y = loader.load_batch(elements)
    out = loader.preprocess(x, y)
    return out[0], out[1]


def _scans_to_probe(scans: Sequence[Any]) -> list[Any]:
    """The first labelled scan, then per axis where scans differ one that differs there (the
    one differing from the first on the most axes first): a handful, whatever the data set."""
    labelled = [s for s in scans if s.meta.has_mask]
    if not labelled:
        return []
    first = labelled[0]
    others = sorted(
        (s for s in labelled if tuple(s.shape) != tuple(first.shape)),
        key=lambda s: -sum(a != b for a, b in zip(s.shape, first.shape, strict=True)),
    )
    chosen = [first]
    for axis in range(3):
        if any(s.shape[axis] != first.shape[axis] for s in chosen):
            continue
        other = next((s for s in others if s.shape[axis] != first.shape[axis]), None)
        if other is not None:
            chosen.append(other)
    return chosen


def shape_probes(loader: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """One-example batches (x, y) of the scans :func:`_scans_to_probe` picks; none when every
    scan has the same shape (then neither do the examples)."""
    cached = getattr(loader, "_shape_probes", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    scans = _scans_to_probe(loader.scans)
    probes = []
    if len(scans) > 1:
        probes = [p for p in (_one_example(loader, s) for s in scans) if p is not None]
    loader._shape_probes = probes
    return probes


def varying_shape(arrays: Sequence[np.ndarray]) -> tuple[int | None, ...]:
    """The shape of ``arrays`` past the batch axis, None on every axis where they differ."""
    shapes = [a.shape[1:] for a in arrays]
    if len({len(s) for s in shapes}) > 1:
        raise ValueError(f"examples of different ranks: {sorted({tuple(s) for s in shapes})}")
    return tuple(dims[0] if len(set(dims)) == 1 else None for dims in zip(*shapes, strict=True))


def examples_differ(probes: Sequence[tuple[np.ndarray, np.ndarray]]) -> bool:
    """Do the probes' x or y differ in shape past the batch axis?"""
    return any(None in varying_shape([p[i] for p in probes]) for i in range(2))


def keras_probe_batch(loader: Any, index: int) -> tuple[np.ndarray, np.ndarray] | None:
    """What Keras' TensorFlow spec probe (its first two batches) gets when the loader's
    examples differ in shape: two examples that differ on the varying axes. None otherwise
    (the probe reads batches as usual); the probe's batches are never trained on."""
    probes = shape_probes(loader)
    if len(probes) < 2 or index not in (0, 1):
        return None
    if not examples_differ(probes):
        return None  # the scans differ, the examples do not (patches, crops): read as usual
    if index == 0:
        return probes[0]
    # the probe that differs from the first on the most axes
    return max(
        probes[1:],
        key=lambda p: (
            sum(a != b for a, b in zip(p[0].shape, probes[0][0].shape, strict=True))
            + sum(a != b for a, b in zip(p[1].shape, probes[0][1].shape, strict=True))
        ),
    )
