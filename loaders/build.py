"""``build_loader``: MedSegPy's entry point, over registered datasets."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from loaders.base import DataLoader
from loaders.catalog import DatasetCatalog
from loaders.config import Config, check_batching
from loaders.keras_reading import INSTEAD, KERAS_READING_ARGS
from loaders.registry import build_data_loader


def get_dataset_dicts(dataset_names: str | Sequence[str], filter_empty: bool = True) -> list[dict[str, Any]]:
    """Dataset dicts of registered datasets; ``filter_empty`` drops scans without a mask."""
    try:  # one name, or any iterable of them (a list, a tuple, a set, dict keys)
        names = (dataset_names,) if isinstance(dataset_names, str) else tuple(dataset_names)
    except TypeError:
        names = (dataset_names,)  # type: ignore[assignment]
    if not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"dataset_names: {dataset_names!r} is not a dataset name (a string registered with "
            "DatasetCatalog.register) or a list of them"
        )
    if not names:
        raise ValueError("no dataset name given")
    per_name = [DatasetCatalog.get(name) for name in names]
    for name, dicts in zip(names, per_name, strict=True):
        if not dicts:
            raise ValueError(f"dataset {name!r} is empty")
    dicts = list(itertools.chain.from_iterable(per_name))
    if filter_empty:
        dicts = [d for d in dicts if d.get("has_mask", True)]
    return dicts


def build_loader(
    cfg: Config,
    dataset_names: str | Sequence[str],
    batch_size: int,
    is_test: bool,
    shuffle: bool,
    drop_last: bool,
    num_replicas: int = 1,
    rank: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """The ``cfg.TAG`` loader over ``dataset_names`` (one name or several).

    ``num_replicas`` and ``rank`` shard it for data-parallel training: in every epoch each rank
    reads its own disjoint share (``loaders.ordering``), all ranks have the same ``len()``.
    A test loader (``is_test``) also holds the scans without a mask, for ``inference`` and
    ``write_predictions`` (its batches hold the labelled scans); a training loader leaves them out.
    """
    for name in KERAS_READING_ARGS:  # Keras' PyDataset options: one line, not a TypeError
        if name in kwargs:
            raise ValueError(f"build_loader({name}={kwargs[name]!r}): {INSTEAD}")
    # checked here, where they enter: True == 1 would otherwise pass as "no sharding"
    batch_size, num_replicas, rank = check_batching(batch_size, num_replicas, rank)
    if num_replicas != 1 or rank != 0:
        kwargs.update(num_replicas=num_replicas, rank=rank)
    # A test loader also predicts scans without a mask (nnU-Net imagesTs without labelsTs);
    # a training loader needs labels and leaves them out, as MedSegPy's filter_empty does.
    every = get_dataset_dicts(dataset_names, filter_empty=False)
    dicts = every if is_test else [d for d in every if d.get("has_mask", True)]
    if not dicts:
        raise ValueError(
            f"datasets {dataset_names!r} hold no labelled scans (scan {every[0]['scan_id']!r} has no mask):"
            " training loaders need labels; predict them with a test loader (is_test=True)"
        )
    if is_test:
        _warn_of_augmented_copies(dataset_names, dicts)
    loader = build_data_loader(
        cfg, dicts, batch_size=batch_size, is_test=is_test, shuffle=shuffle, drop_last=drop_last, **kwargs
    )
    # said here, once: torch workers and copies rebuild the loader from its class
    loader._warn_of_a_sharded_test_loader()
    return loader


def _warn_of_augmented_copies(dataset_names: str | Sequence[str], dicts: list[dict[str, Any]]) -> None:
    """A test loader over augmented copies (MedSegPy's Aug01, Aug02, ... of a scan) predicts
    and scores each copy as a scan of its own: said, since validation figures then count one
    scan several times."""
    copies = [d["scan_id"] for d in dicts if d.get("augmentation") not in (None, 0)]
    if copies:
        import warnings

        warnings.warn(
            f"test loader over {dataset_names!r}: {len(copies)} of its {len(dicts)} scans are augmented "
            f"copies (augmentation > 0, e.g. {copies[0]!r}), each predicted and scored as a scan; "
            "register the dataset with augmentation=0 to leave them out",
            UserWarning,
            stacklevel=3,
        )
