"""``write_predictions(loader, model, path)``: per-scan inference into a Zarr v3 predictions store.

The store's layout is ``store.predictions`` (which the server reads). Per scan, in the order
``loader.inference(model)`` yields them:

* ``probabilities`` (H, W, D, C) float16: the stitched ``y_pred``;
* ``label_map`` (H, W, D) uint8: 0 = no class, k+1 = category k. With a background channel
  (``INCLUDE_BACKGROUND``) a voxel takes the most probable channel, background meaning 0;
  without one, the most probable category if its probability is at least 0.5, else 0;
  overlapping categories (regions) give each voxel the last category at 0.5 or more;
* attributes: per-category Dice of the label map against ``y_true`` (1.0 where both are empty;
  for regions, of each channel's probability at 0.5 or more),
  the categories (as class indices) and their names (``class_names``, parallel to ``dice``;
  ``channel_names`` for the probabilities' channels), the scan's geometry (for the NIfTI
  export, ``loaders.export``), when and with what the scan was written, and NGFF 0.5
  label-image metadata (``store.ome``), so napari and neuroglancer open a prediction as labels.

Each scan is written to ``PATH/.staging/`` and published as a new version by one atomic symlink
switch (``Storage.publish``, shared with the scan store); a re-run skips scans
already in the store unless ``overwrite=True``. One writer at a time holds ``PATH/.lock``
(``Storage.lock``, as the preprocessing job): a second fails at once naming the holder. Arrays are converted and written slab by slab
(whole chunks of slices), so memory stays within the one scan's output ``inference`` yields.
"""

from __future__ import annotations

import copy
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from loaders.backend import import_keras
from store import ome, ome_views, publish
from store.categories import Categories, categories_json_value, category_names, parse_categories
from store.errors import one_line
from store.predictions import (
    LABEL_MAP,
    PREDICTIONS_FORMAT,
    PROBABILITIES,
    ROOT_KEY,
    SCAN_KEY,
    PredictionStore,
    check_predictions_root,
)
from store.progress import Progress
from store.storage import Storage, open_storage, parse_location
from store.units import count_of

SLAB_SLICES = 16  # slices converted and written at a time: whole chunks (CHUNK_DEPTH divides it)
CHUNK_YX = 128
CHUNK_DEPTH = 8


@dataclass(frozen=True)
class PredictionSummary:
    """What ``write_predictions`` did: scans written and skipped, and the Dice of each, as
    written now or (skipped) stored by the run that wrote it."""

    path: Path | str  # a folder, or s3://BUCKET/PREFIX
    written: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    dice: dict[str, list[float] | None] = field(default_factory=dict)
    # per scan, the name of each category (parallel to its ``dice``)
    class_names: dict[str, list[str]] = field(default_factory=dict)

    def dice_by_class(self) -> dict[str, dict[str, float] | None]:
        """Per scan, ``{class name: Dice}`` (None for a scan without a mask)."""
        out: dict[str, dict[str, float] | None] = {}
        for scan_id, scores in self.dice.items():
            names = self.class_names.get(scan_id) or [f"category {k}" for k in range(len(scores or ()))]
            out[scan_id] = None if scores is None else dict(zip(names, scores, strict=True))
        return out

    def mean_dice(self) -> dict[str, float]:
        """Per class name, the mean Dice over the scans scored (those with a mask): the
        validation figure nnU-Net's summary gives as its per-class mean. A class absent from
        both a scan's labels and its prediction scores 1.0 there (nnU-Net leaves it out)."""
        scores: dict[str, list[float]] = {}
        for by_class in self.dice_by_class().values():
            for name, value in (by_class or {}).items():
                scores.setdefault(name, []).append(value)
        return {name: float(np.mean(values)) for name, values in scores.items()}

    def __str__(self) -> str:
        # a re-run with another model skips what the first wrote: say how to replace it
        how = ": overwrite=True replaces them" if self.skipped else ""
        return (
            f"{count_of(len(self.written), 'scan')} written, {len(self.skipped)} already there "
            f"(skipped{how}), in {self.path}"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """What a notebook shows for ``write_predictions(...)`` as a cell's last line: the
        sentence above (with its hint when a re-run skipped everything), not the fields."""
        printer.text(str(self))


def label_map(probabilities: np.ndarray, include_background: bool) -> np.ndarray:
    """(..., C) probabilities -> (...) uint8 labels: 0 = no class, k+1 = category k."""
    if probabilities.shape[-1] - (1 if include_background else 0) > 255:
        raise ValueError(f"{probabilities.shape[-1]} channels do not fit a uint8 label map")
    best = probabilities.argmax(axis=-1).astype(np.uint8)
    if include_background:
        return best  # channel 0 is background (label 0); channel k is category k-1 (label k)
    confident = np.take_along_axis(probabilities, best[..., None].astype(np.intp), axis=-1)[..., 0] >= 0.5
    return np.where(confident, best + np.uint8(1), np.uint8(0)).astype(np.uint8)


# float32 softmax outputs may stray a little past [0, 1]; logits stray far
PROBABILITY_SLACK = 1e-3


def region_label_map(probabilities: np.ndarray, include_background: bool) -> np.ndarray:
    """(..., C) probabilities of overlapping categories (regions, each its own sigmoid) ->
    (...) uint8 labels: category k's label k+1 where its probability is at least 0.5, a later
    category over an earlier one (nnU-Net's ``regions_class_order``: list regions from the
    largest to the smallest, BraTS' whole tumour, tumour core, enhancing), else 0."""
    offset = int(include_background)
    labels = np.zeros(probabilities.shape[:-1], np.uint8)
    for k in range(probabilities.shape[-1] - offset):
        labels[probabilities[..., offset + k] >= 0.5] = k + 1
    return labels


def overlapping(categories: Categories | None) -> bool:
    """Whether some class is in two categories (regions)."""
    classes = [k for group in categories or () for k in group]
    return len(classes) != len(set(classes))


def dice_from_counts(overlap: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> list[float]:
    """Per-category Dice 2|A∩B| / (|A|+|B|), 1.0 where both are empty."""
    total = truth + predicted
    return [float(2 * o / t) if t else 1.0 for o, t in zip(overlap, total, strict=True)]


def _root(storage: Storage) -> None:
    """Create the predictions store, or check that ``storage`` is one (never write into a scan store)."""
    if storage.read("zarr.json") is not None:
        check_predictions_root(storage)
        return
    local = storage.local_path()
    if local is not None and local.exists() and not local.is_dir():
        raise ValueError(f"{storage}: is a file; choose an empty folder")
    if not storage.is_empty():
        raise ValueError(f"{storage}: not empty and not a predictions store; choose an empty folder")
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
    root_doc = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {ROOT_KEY: {"format": PREDICTIONS_FORMAT}},
    }
    storage.write_json("zarr.json", root_doc)


def publish_scan(staged: Path, root: Storage, scan_id: str) -> str:
    """Make a staged scan visible as the scan store does (``Storage.publish``: a symlink switch
    in one atomic rename, or a pointer object written last); returns the version. A reader
    sees the old prediction or the new one, never a mix; old versions go after a grace period."""
    return root.publish(scan_id, staged)


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def _written_by(loader: Any, model: Any, predict_kwargs: dict[str, Any]) -> dict[str, Any]:
    keras = import_keras()

    return {
        "model": str(getattr(model, "name", None) or type(model).__name__),
        "loader": type(loader).__name__,
        "tag": getattr(loader.cfg, "TAG", None),
        "predict_kwargs": {k: repr(v) for k, v in sorted(predict_kwargs.items())},
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "scancache": _version("scancache"),
    }


class _ScanWriter:
    """Writes one scan's arrays into a staged folder, slab by slab, accumulating Dice counts."""

    def __init__(self, staged: Path, shape: tuple[int, int, int], channels: int) -> None:
        self.group = zarr.open_group(str(staged), mode="w", zarr_format=3)
        chunk = (min(CHUNK_YX, shape[0]), min(CHUNK_YX, shape[1]), min(CHUNK_DEPTH, shape[2]))
        self.probabilities = self.group.create_array(
            PROBABILITIES,
            shape=(*shape, channels),
            chunks=(*chunk, channels),
            dtype="float16",
            fill_value=0,
            dimension_names=["y", "x", "z", "class"],
        )
        self.labels = self.group.create_array(
            LABEL_MAP, shape=shape, chunks=chunk, dtype="uint8", fill_value=0, dimension_names=["y", "x", "z"]
        )

    def write(
        self, y_pred: np.ndarray, y_true: np.ndarray | None, include_background: bool, regions: bool = False
    ) -> list[float] | None:
        """Probabilities and label map, slab by slab; Dice per category from the label map, or
        for overlapping categories (``regions``) from each channel's probability >= 0.5, as a
        voxel there belongs to several (nnU-Net's region-based evaluation)."""
        categories = y_pred.shape[-1] - int(include_background)
        with_truth = y_true is not None and y_true.shape == y_pred.shape
        counts = np.zeros((3, max(categories, 0)), np.int64)  # overlap, truth, predicted
        offset = int(include_background)
        for z0 in range(0, y_pred.shape[2], SLAB_SLICES):
            z = slice(z0, min(z0 + SLAB_SLICES, y_pred.shape[2]))
            probs = y_pred[:, :, z]
            self.probabilities[:, :, z, :] = probs.astype(np.float16)
            labels = (
                region_label_map(probs, include_background)
                if regions
                else label_map(probs, include_background)
            )
            self.labels[:, :, z] = labels
            if with_truth:
                assert y_true is not None
                for k in range(categories):
                    truth = y_true[:, :, z, offset + k] > 0.5
                    predicted = probs[..., offset + k] >= 0.5 if regions else labels == k + 1
                    counts[:, k] += (
                        np.count_nonzero(truth & predicted),
                        np.count_nonzero(truth),
                        np.count_nonzero(predicted),
                    )
        return dice_from_counts(*counts) if with_truth else None


@dataclass(frozen=True)
class _Meta:
    """What every scan's attributes share: the loader's scans, classes and the writer."""

    entries: dict[str, Any]
    include_background: bool
    categories: Any
    written_by: dict[str, Any]
    warned: set[str] = field(default_factory=set)  # warnings said once a run


def _names_and_geometry(entry: Any, categories: Any, include_background: bool) -> dict[str, Any]:
    """The attributes that name a scan's categories and carry its geometry: ``categories`` as
    class indices, ``class_names`` (label-map value k+1 is category k; "a+b" for merged
    classes), ``channel_names`` (probabilities, "background" first when included), and what
    the NIfTI export needs: the scan's shape, spacing, affine, source affine and label values."""
    if entry is None:  # a loader that keeps its scans elsewhere: the categories as configured
        cats = parse_categories(categories) if categories else None
        return {"categories": categories_json_value(cats) if cats else None}
    resolved: Categories | None = entry.categories
    scan = entry.meta
    # a scan without a mask that records no names has the categories of the loader's other
    # scans (loaders.scans.categories_of): "class k" names the classes it does not
    used = max((k for group in resolved or () for k in group), default=-1) + 1
    scan_names = scan.class_names + [f"class {k}" for k in range(len(scan.class_names), used)]
    names = category_names(resolved, scan_names)
    fields: dict[str, Any] = {
        "categories": categories_json_value(resolved) if resolved else None,
        "class_names": names,
        "channel_names": ["background", *names] if include_background else names,
        "scan_shape": list(scan.shape),
        "spacing": list(scan.spacing),
        "affine": scan.affine,
        "source_affine": scan.source_affine,
        "scan_class_names": scan.class_names,
        "label_values": scan.label_values,
        # the version predicted from: a server refuses to show it as another version's (409)
        "scan_version": scan.version,
    }
    if scan.attrs.get("source_shape") is not None:
        fields["source_shape"] = [int(n) for n in scan.attrs["source_shape"]]
    if isinstance(scan.attrs.get("source_header"), dict):  # the export writes the source's codes
        fields["source_header"] = scan.attrs["source_header"]
    return fields


def _write_scan(
    staged: Path, root: Storage, scan_id: str, outputs: dict[str, Any], meta: _Meta
) -> tuple[list[float] | None, list[str] | None]:
    """Write one scan's arrays and attributes in ``staged`` and publish it; returns its Dice
    and the categories' names."""
    y_pred = np.asarray(outputs["y_pred"])
    y_true = outputs.get("y_true")
    if y_true is not None and np.asarray(y_true).shape[-1] != y_pred.shape[-1]:
        # kept (a model of other categories may be wanted), but not silently: no names, no Dice
        warnings.warn(
            f"scan {scan_id!r}: the model predicts {y_pred.shape[-1]} channels, but the loader's categories "
            f"(CATEGORIES{' and the background' if meta.include_background else ''}) are "
            f"{np.asarray(y_true).shape[-1]}: stored without class names or Dice",
            stacklevel=4,
        )
    if not np.isfinite(y_pred).all():
        bad = int(np.count_nonzero(~np.isfinite(y_pred)))
        raise ValueError(
            f"scan {scan_id!r}: the model's output holds {bad} NaN or infinite values; nothing written"
        )
    low, high = float(y_pred.min(initial=0.0)), float(y_pred.max(initial=0.0))
    if (low < -PROBABILITY_SLACK or high > 1 + PROBABILITY_SLACK) and "range" not in meta.warned:
        meta.warned.add("range")  # once a run: every scan of a logits model would say the same
        warnings.warn(
            f"scan {scan_id!r}: the model's outputs range from {low:.3g} to {high:.3g}, not probabilities in "
            "[0, 1] (logits?): they are stored as they are, and the label map and Dice read them as "
            "probabilities; end the model with a softmax or a sigmoid",
            stacklevel=4,
        )
    try:
        labels = y_pred.shape[-1] - (1 if meta.include_background else 0)
        if labels > 255:  # an atlas of hundreds of regions: the scan store holds them, this cannot
            raise ValueError(
                f"scan {scan_id!r}: {labels} categories do not fit the predictions' uint8 label map "
                "(at most 255); predict at most 255 at a time (CATEGORIES)"
            )
        writer = _ScanWriter(
            staged, (int(y_pred.shape[0]), int(y_pred.shape[1]), int(y_pred.shape[2])), int(y_pred.shape[-1])
        )
        entry = meta.entries.get(scan_id)
        regions = entry is not None and overlapping(entry.categories)
        scores = writer.write(y_pred, outputs.get("y_true"), meta.include_background, regions)
        partial = entry is not None and len(entry.slices) != entry.shape[2]
        attrs = {
            "scan_id": scan_id,
            "shape": list(y_pred.shape[:3]),
            "channels": int(y_pred.shape[-1]),
            **_names_and_geometry(entry, meta.categories, meta.include_background),
            "include_background": meta.include_background,
            "regions": regions,  # overlapping categories: the label map's later category wins
            "slices": list(entry.slices) if partial and entry is not None else None,
            "dice": scores,
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "written_by": meta.written_by,
        }
        num_categories = int(y_pred.shape[-1]) - int(meta.include_background)
        if len(attrs.get("class_names") or ()) != num_categories:  # a model with other outputs
            attrs.pop("class_names", None)
            attrs.pop("channel_names", None)
            # no mask, so no Dice either: the viewer's legend counts the categories by their names
            if entry is not None and not entry.meta.has_mask:
                attrs["class_names"] = [f"category {k}" for k in range(num_categories)]
        # NGFF 0.5 label image over a (z, y, x) view of label_map, in the scan's spacing
        spacing = ome.spacing_of(entry.meta.attrs) if entry is not None else ome.DEFAULT_SPACING
        label_ome = ome_views.write_label_image_view(
            staged, f"{scan_id} prediction", LABEL_MAP, num_categories, spacing
        )
        writer.group.attrs.update({SCAN_KEY: attrs, "ome": label_ome})
        publish_scan(staged, root, scan_id)
    except OSError as err:  # a full disk: said with the scan and the store, nothing left staged
        shutil.rmtree(staged, ignore_errors=True)
        if type(err) is not OSError or err.errno is None:
            raise  # a PermissionError, a StoreUnavailable and the like keep their kind
        where = f"{err.filename}: " if err.filename else ""
        raise OSError(
            err.errno,
            f"scan {scan_id!r}: its predictions could not be written to {root.url}: {where}{err.strerror}",
        ) from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return scores, attrs.get("class_names")


def _scan_entries(loader: Any) -> dict[str, Any]:
    return {s.scan_id: s for s in getattr(loader, "scans", ())}


def _predicted(store: PredictionStore, scan_id: str, entry: Any) -> bool:
    """The store holds a prediction of this version of the scan (one made from an older version,
    before the scan was converted again, is predicted anew, not skipped)."""
    attrs = store.attrs(scan_id)
    if attrs is None:
        return False
    recorded, current = attrs.get("scan_version"), getattr(getattr(entry, "meta", None), "version", None)
    return not (isinstance(recorded, str) and current is not None and recorded != current)


def _pending_loader(loader: Any, done: set[str]) -> Any:
    """The loader limited to scans not yet written (a shallow copy), so skipped scans cost nothing.

    If a loader keeps its scans elsewhere, the original is used and written scans are skipped
    as they come (correct, only slower)."""
    scans = getattr(loader, "scans", None)
    if not done or not isinstance(scans, list):
        return loader
    limited = copy.copy(loader)
    limited.scans = [s for s in scans if s.scan_id not in done]
    return limited


def write_predictions(
    loader: Any,
    model: Any,
    path: str | Path,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    **predict_kwargs: Any,
) -> PredictionSummary:
    """Run ``loader.inference(model, **predict_kwargs)`` and write each scan's prediction to ``path``.

    ``overwrite=True`` redoes scans already written; ``progress`` (default: on a terminal or in
    a notebook) shows a bar of scans (``store.progress``). Returns a :class:`PredictionSummary`. One writer at a time: while
    another holds ``path/.lock``, this fails at once with ``StoreLocked`` naming its pid and host.
    """
    root = open_storage(parse_location(path))
    _root(root)
    # One writer at a time, as one job per scan store: two runs would both find a scan missing
    # and both publish it (the second replacing the first without overwrite=True).
    lock = root.lock(
        writer="write_predictions",
        advice=f"wait for it to finish, or delete {root.url}/.lock if that writer is gone",
    )
    with lock:
        summary = _write_locked(loader, model, root, overwrite, progress, predict_kwargs)
    if getattr(lock, "release_error", None):  # the predictions are written: said, not raised
        warnings.warn(
            f"{root.url}: the predictions are written, but its lock could not be removed "
            f"({lock.release_error}); delete {root.url}/.lock before the next write_predictions",  # type: ignore[attr-defined]
            stacklevel=2,
        )
    return summary


def _write_locked(
    loader: Any,
    model: Any,
    root: Storage,
    overwrite: bool,
    progress: bool | None,
    predict_kwargs: dict[str, Any],
) -> PredictionSummary:
    store = PredictionStore(root)
    entries = _scan_entries(loader)
    done = set() if overwrite else {s for s in entries if _predicted(store, s, entries.get(s))}
    skipped = sorted(done)
    bar = Progress(len(entries) - len(done), label="write_predictions", enabled=progress)
    cats = getattr(loader.cfg, "CATEGORIES", None)
    written: list[str] = []
    dice: dict[str, list[float] | None] = {}
    names: dict[str, list[str]] = {}
    meta = _Meta(
        entries,
        bool(getattr(loader.cfg, "INCLUDE_BACKGROUND", False)),
        cats,
        _written_by(loader, model, predict_kwargs),
    )
    for upkeep in (
        root.clean_stale_staging,  # left by a killed writer (never a live one's)
        lambda: root.remove_old_versions(publish.DEFAULT_GRACE_S),  # superseded an hour ago
    ):
        try:
            upkeep()
        except publish.LeftInStore as err:  # another user's, on a shared store: room only
            warnings.warn(f"{root.url}: {one_line(err)}", stacklevel=3)
    staging = root.new_staging("predictions")  # this writer's, owned by its pid
    try:
        for inputs, outputs in _inference(_pending_loader(loader, done), model, predict_kwargs):
            scan_id = inputs["scan_id"]
            if scan_id in done or (not overwrite and _predicted(store, scan_id, entries.get(scan_id))):
                if scan_id not in skipped:
                    skipped.append(scan_id)
                continue
            scores, scan_names = _write_scan(
                staging / f"{scan_id}.{uuid.uuid4().hex[:12]}", root, scan_id, outputs, meta
            )
            written.append(scan_id)
            dice[scan_id] = scores
            if scan_names is not None:
                names[scan_id] = scan_names
            bar.advance(scan_id)
            del outputs  # the caller of inference holds one scan's output at a time
    finally:
        bar.close()
        root.remove_staging(staging)
    for scan_id in skipped:  # written before: the Dice stored with them (a re-run reports all)
        stored = store.attrs(scan_id) or {}
        scores, scan_names = stored.get("dice"), stored.get("class_names")
        dice[scan_id] = [float(v) for v in scores] if isinstance(scores, list) else None
        if isinstance(scan_names, list):
            names[scan_id] = [str(n) for n in scan_names]
    return PredictionSummary(
        root.local_path() or root.url,
        tuple(written),
        tuple(sorted(skipped)),
        dict(sorted(dice.items())),
        names,
    )


def _inference(
    loader: Any, model: Any, predict_kwargs: dict[str, Any]
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    if not getattr(loader, "scans", True):  # every scan already written
        return iter(())
    return iter(loader.inference(model, **predict_kwargs))
