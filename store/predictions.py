"""The predictions store (written by ``loaders.write_predictions``) and its reader.

::

    PRED/zarr.json                      root group, attributes {"scancache_predictions": {"format": 1}}
    PRED/<scan_id> -> .versions/<scan_id>/<version>   relative symlink, switched atomically (store/publish.py)
    PRED/<scan_id>/zarr.json            one group per scan: attributes "prediction" (below) and "ome"
    PRED/<scan_id>/probabilities/       (H, W, D, C) float16, the stitched y_pred
    PRED/<scan_id>/label_map/           (H, W, D) uint8: 0 = no class, k+1 = category k
    PRED/.staging/                      scans being written; never read

The ``prediction`` attribute holds ``scan_id``, ``shape``, ``channels``, ``categories``,
``class_names`` (each category's name, parallel to ``dice``), ``channel_names`` (the
probabilities' channels), the scan's geometry (``scan_shape``, ``spacing``, ``affine``,
``source_affine``, ``scan_class_names``, ``label_values``; ``loaders.export``),
``include_background``, ``dice`` (per category, or null without a mask), ``written_at`` (UTC,
ISO 8601) and ``written_by`` (model, loader, versions). Stores written before names and
geometry were recorded lack those keys and stay readable. A scan group appears only by an atomic
symlink switch once complete, so every ``PRED/<scan_id>/zarr.json`` a reader finds is complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import tensorstore as ts

from store.errors import ArrayNotFound, PredictionMismatch
from store.format import validate_scan_id
from store.lru import BoundedLRU
from store.publish import STAGING_DIR as STAGING_DIR  # one name for the staging folder
from store.roi import Region
from store.storage import Storage, open_storage

PREDICTIONS_FORMAT = 1
ROOT_KEY = "scancache_predictions"
SCAN_KEY = "prediction"
PROBABILITIES = "probabilities"
LABEL_MAP = "label_map"
PREDICTION_ARRAYS = (PROBABILITIES, LABEL_MAP)
# a scan's attributes and its open arrays, a few hundred bytes each: bounded in entries
ATTRS_CACHE_ENTRIES = 4096
ARRAY_CACHE_ENTRIES = 256


def check_predictions_root(path: str | os.PathLike[str] | Storage) -> None:
    """Refuse, in one line, a folder that is not a predictions store of this format."""
    try:
        attrs = open_storage(path).read_json("zarr.json").get("attributes", {})
    except (ValueError, AttributeError):
        raise FileNotFoundError(f"{path}: not a predictions store (no readable zarr.json)") from None
    found = attrs.get(ROOT_KEY, {}).get("format") if isinstance(attrs.get(ROOT_KEY), dict) else None
    if found is None:
        raise ValueError(f"{path}: a Zarr group but not a predictions store")
    if found != PREDICTIONS_FORMAT:
        raise ValueError(
            f"{path}: predictions store format {found}, this scancache reads format {PREDICTIONS_FORMAT};"
            " re-run write_predictions into a new folder"
        )


class PredictionStore:
    """Reads a predictions store (a folder or ``s3://...``); thread-safe. A missing folder is an
    empty store."""

    def __init__(self, path: str | os.PathLike[str] | Storage, cache_bytes: int = 64 * 2**20) -> None:
        self.storage = open_storage(path)
        self.root = self.storage.local_path() or Path(self.storage.url)
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}})
        # keyed by the scan's published version: a re-published scan is a new entry and the
        # superseded one ages out
        self._attrs: BoundedLRU[tuple[str, dict[str, Any]]] = BoundedLRU(ATTRS_CACHE_ENTRIES)
        self._arrays: BoundedLRU[Any] = BoundedLRU(ARRAY_CACHE_ENTRIES)

    def __repr__(self) -> str:
        return f"PredictionStore({self.storage.url!r})"

    def _signature(self, scan_id: str) -> str | None:
        return self.storage.current_version(scan_id)

    def has(self, scan_id: str) -> bool:
        return self.attrs(scan_id) is not None

    def attrs(self, scan_id: str) -> dict[str, Any] | None:
        """The scan's ``prediction`` attribute, or None if it has no (readable) prediction."""
        validate_scan_id(scan_id)
        sig = self._signature(scan_id)
        if sig is None:
            return None
        cached = self._attrs.get(scan_id)
        if cached and cached[0] == sig:
            return cached[1]
        try:
            doc = self.storage.read_json(f"{self.storage.version_key(scan_id, sig)}/zarr.json")
            attrs = doc["attributes"][SCAN_KEY]
        except (OSError, KeyError, ValueError, TypeError):
            return None
        if not isinstance(attrs, dict):
            return None
        self._attrs.put(scan_id, (sig, attrs))
        return attrs

    def version(self, scan_id: str) -> str:
        """Changes whenever the scan's prediction is re-published (for ETags)."""
        sig = self._signature(scan_id)
        if sig is None:
            raise ArrayNotFound(f"scan {scan_id!r} has no prediction")
        return sig

    def scan_ids(self) -> list[str]:
        return self.storage.published_names()

    def shape(self, scan_id: str, array: str) -> tuple[int, ...]:
        attrs = self.attrs(scan_id)
        if attrs is None:
            raise ArrayNotFound(f"scan {scan_id!r} has no prediction")
        volume = tuple(int(n) for n in attrs["shape"])
        return (*volume, int(attrs["channels"])) if array == PROBABILITIES else volume

    def stored_shape(self, scan_id: str, array: str) -> tuple[int, ...]:
        """The shape the array's own metadata gives (what a read is bounded by)."""
        return tuple(int(n) for n in self._array(scan_id, array).shape)

    def _array(self, scan_id: str, array: str) -> Any:
        if array not in PREDICTION_ARRAYS:
            raise ArrayNotFound(
                f"no prediction array {array!r}; expected one of {', '.join(PREDICTION_ARRAYS)}"
            )
        sig = self._signature(scan_id)
        if sig is None or self.attrs(scan_id) is None:
            raise ArrayNotFound(f"scan {scan_id!r} has no prediction")
        key = (scan_id, array, sig)
        arr = self._arrays.get(key)
        if arr is None:
            spec = {
                "driver": "zarr3",
                "kvstore": self.storage.kvstore(f"{self.storage.version_key(scan_id, sig)}/{array}"),
            }
            try:
                arr = ts.open(spec, context=self._context, read=True, open=True).result()
            except ValueError:
                raise ArrayNotFound(f"scan {scan_id!r}: prediction has no {array!r}") from None
            self._arrays.put(key, arr)
        return arr

    def read(self, scan_id: str, array: str, region: Region) -> np.ndarray:
        """A region (one slice per volume axis; probabilities keep every channel)."""
        return np.asarray(self._array(scan_id, array)[tuple(region)].read().result())


def require_prediction(store: PredictionStore | None, scan_id: str) -> dict[str, Any]:
    """The scan's prediction attributes, or ArrayNotFound (404) naming the scan."""
    attrs = None if store is None else store.attrs(scan_id)
    if attrs is None:
        raise ArrayNotFound(f"scan {scan_id!r} has no prediction")
    return attrs


# Whether a stored prediction fits the scan it is served with (the server's prediction routes,
# previews and listings): rules on the store's attributes and the scan's shape and version.


def prediction_fields(
    store: PredictionStore | None, scan_id: str, scan_shape: Any, scan_version: str | None = None
) -> dict[str, Any]:
    """What a scan's metadata says of its prediction: ``has_prediction``, ``prediction_dice``
    (per category) and ``prediction_class_names`` (the categories' names, parallel to the Dice
    and to the label map's values 1, 2, ...; null for predictions written before names were
    recorded). A prediction that does not fit the scan (written for other data: the
    prediction routes answer 409) is not the scan's: no prediction, no Dice."""
    attrs = None if store is None else store.attrs(scan_id)
    if attrs is not None and prediction_mismatch(attrs, scan_id, tuple(scan_shape), scan_version) is not None:
        attrs = None
    names = None if attrs is None else attrs.get("class_names")
    dice = None if attrs is None else attrs.get("dice")
    return {
        "has_prediction": attrs is not None,
        # a list or null, as documented: the viewer maps over it (a hand-edited store may hold anything)
        "prediction_dice": dice if isinstance(dice, list) else None,
        "prediction_class_names": names if isinstance(names, list) else None,
    }


def _dims(shape: Any) -> str:
    return "x".join(str(n) for n in shape)


def _ints(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)


def prediction_mismatch(
    attrs: dict[str, Any], scan_id: str, scan_shape: tuple[int, ...], scan_version: str | None = None
) -> str | None:
    """Why a prediction's attributes do not fit the scan (None: they do): its (H, W, D) must be
    the scan's, or (H, W, len(slices)) with every slice inside the scan, and where it records the
    scan version it was predicted from, that version must be the one served (another store's
    scan of the same id and shape, or a scan converted again since, is other data)."""
    shape, channels, slices = attrs.get("shape"), attrs.get("channels"), attrs.get("slices")
    if not (
        _ints(shape)
        and len(shape) == 3
        and min(shape) > 0
        and isinstance(channels, int)
        and channels > 0
        and (slices is None or _ints(slices))
    ):
        return (
            f"scan {scan_id!r}: the stored prediction's attributes (shape, channels, slices) are malformed;"
            " re-run write_predictions for it (overwrite=True)"
        )
    height, width, depth = (int(n) for n in scan_shape[:3])
    expected = [height, width, len(slices) if slices else depth]
    if shape != expected:
        what = f"{len(slices)} slices of " if slices else ""
        return (
            f"scan {scan_id!r}: the stored prediction is {_dims(shape)}, but the scan is {_dims(scan_shape[:3])}"
            f"{' (' + what + 'it)' if what else ''}; it was written for other data: re-run"
            " write_predictions for it (overwrite=True)"
        )
    if slices and (len(set(slices)) != len(slices) or not all(0 <= z < depth for z in slices)):
        return (
            f"scan {scan_id!r}: the stored prediction names slices that are not the scan's 0..{depth - 1}"
            " (or repeats one); re-run write_predictions for it (overwrite=True)"
        )
    predicted_from = attrs.get("scan_version")
    if isinstance(predicted_from, str) and scan_version is not None and predicted_from != scan_version:
        return (
            f"scan {scan_id!r}: the stored prediction was made from another version of the scan "
            "(another store's, or this scan before it was converted again); re-run write_predictions: "
            "it predicts such scans again"
        )
    return None


def check_prediction(
    store: PredictionStore | None,
    scan_id: str,
    scan_shape: tuple[int, ...],
    array: str,
    scan_version: str | None = None,
) -> dict[str, Any]:
    """The scan's prediction attributes, refused in one line (409) unless the prediction fits
    the scan: its (H, W, D) is the scan's, or (H, W, len(slices)) with every slice inside the
    scan, and the stored array has the shape the attributes say. A prediction written against
    another store with the same scan ids must not be overlaid, nor read past its bounds (500)."""
    attrs = require_prediction(store, scan_id)
    assert store is not None
    why = prediction_mismatch(attrs, scan_id, scan_shape, scan_version)
    if why is not None:
        raise PredictionMismatch(why)
    stored = store.stored_shape(scan_id, array)
    want = store.shape(scan_id, array)
    if stored != want:
        raise PredictionMismatch(
            f"scan {scan_id!r}: the stored prediction's {array} is {_dims(stored)}, but its attributes"
            f" say {_dims(want)}; re-run write_predictions for it (overwrite=True)"
        )
    return attrs
