"""2D and 2.5D slice loaders (MedSegPy's ``DefaultDataLoader`` and ``S25dDataLoader``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loaders.base import DataLoader, Element, register_loader, selects_voxels
from loaders.config import Config
from loaders.geometry import neighbour_window


def _shapes_its_own_examples(cls: type) -> bool:
    """A subclass whose model_input or model_target is its own (a crop, a resize) makes the
    batch's shapes itself: whole slices of other shapes may well stack."""
    return any(getattr(cls, name).__module__ != __name__ for name in ("model_input", "model_target"))


@register_loader
class DefaultDataLoader(DataLoader):
    """2D slices: x ``(N, H, W, 1)`` (``(N, H, W, K)`` for scans of K image channels), y
    ``(N, H, W, C)`` float32.

    One element per slice of every scan (or per listed ``slice_id``). y holds ``CATEGORIES``
    merged as MedSegPy's ``collect_mask`` (a tuple sums its classes), with a background
    channel first when ``INCLUDE_BACKGROUND``. Test batches are ``(x, y, x_raw)`` (``(x, y)``
    to Keras and in ``as_tf_dataset``, where a third element would be sample weights). Slices are
    read in chunk-deep blocks (``cfg.SHUFFLE_BLOCKS``, ``loaders.blocks``).
    """

    reads_blocks = True
    batch_fields: tuple[str, ...] = ("SHUFFLE_BLOCKS",)  # whole slices, whatever IMG_SIZE says

    def build_elements(self) -> Sequence[Element]:
        self._check_one_slice_shape()
        return [
            Element(scan.index, ((0, scan.shape[0]), (0, scan.shape[1]), (z, z + 1)))
            for scan in self.scans
            for z in scan.slices
        ]

    def _check_one_slice_shape(self) -> None:
        """A training batch stacks whole slices: refuse here, not at the first batch, a data set
        whose slices differ in shape (nnU-Net cases often do; so does a case whose file axes
        are permuted, after the stored P, L, S orientation). A test loader predicts scan by scan
        (inference works), so only its batches refuse, when asked for."""
        if self.is_test or self.batch_size == 1 or _shapes_its_own_examples(type(self)):
            return
        first: dict[tuple[int, int], Any] = {}
        for scan in self.scans:
            first.setdefault((int(scan.shape[0]), int(scan.shape[1])), scan)
        if len(first) > 1:
            (a, entry_a), (b, entry_b) = list(first.items())[:2]
            scan_a, scan_b = entry_a.scan_id, entry_b.scan_id
            if scan_a == scan_b:  # one id in two stores (a catalog callable mixing sources)
                scan_a, scan_b = f"{scan_a} of {entry_a.source!r}", f"{scan_b} of {entry_b.source!r}"
            raise ValueError(
                f"{type(self).__name__}: slices differ in shape ({a[0]}x{a[1]} in {scan_a}, "
                f"{b[0]}x{b[1]} in {scan_b}) and a batch stacks whole slices: use batch_size=1, "
                "a patch loader (TAG='PatchDataLoader' or 'RandomPatchDataLoader'), or resample "
                "the scans to one grid"
            )

    def model_input(self, image: np.ndarray, element: Element) -> np.ndarray:
        if image.ndim == 3:
            return image  # (H, W, 1): the slice axis is the channel
        # K image channels: (H, W, k, K) -> (H, W, k * K), channel s * K + c = slice s, channel c
        return image.reshape(image.shape[0], image.shape[1], -1)

    @selects_voxels
    def model_target(self, mask: np.ndarray, element: Element) -> np.ndarray:
        return mask[:, :, 0]  # (H, W, 1, C) -> (H, W, C)

    def from_prediction(self, prediction: np.ndarray, element: Element) -> np.ndarray:
        return prediction[:, :, None]


@register_loader
class S25dDataLoader(DefaultDataLoader):
    """2.5D: ``IMG_SIZE = (H, W, k)``, k odd; x holds slices ``z-k//2 .. z+k//2`` as channels.

    Slices beyond the scan's ends are filled with ``IMG_PAD_MODE`` (as ``np.pad`` of the
    volume along z); y is the centre slice's mask. Scans of K image channels give x
    ``(N, H, W, k * K)``, slices by channels: channel ``s * K + c`` is image channel c of the
    window's slice s (all channels of the first slice, then of the next, ...).
    """

    batch_fields = ("IMG_SIZE", "SHUFFLE_BLOCKS")

    def __init__(
        self,
        cfg: Config,
        dataset_dicts: Sequence[dict[str, Any]],
        is_test: bool = False,
        shuffle: bool = True,
        drop_last: bool = False,
        batch_size: int = 1,
        **sharding: Any,
    ) -> None:
        if len(cfg.IMG_SIZE) != 3:
            raise ValueError(f"IMG_SIZE: 2.5D needs (H, W, k), got {tuple(cfg.IMG_SIZE)}")
        self.window = int(cfg.IMG_SIZE[-1])
        try:
            neighbour_window(0, self.window)  # validates k
        except ValueError as err:
            channels = max(
                (int(getattr(d.get("_meta"), "channels", 1) or 1) for d in dataset_dicts), default=1
            )
            if channels > 1:  # k x K given for k? x gets the K channels of each of k slices
                k = self.window // channels
                example = (
                    f"; IMG_SIZE=(H, W, {k}) gives x {self.window} channels"
                    if self.window % channels == 0 and k % 2 == 1
                    else ""
                )
                raise ValueError(
                    f"{err}: it counts the window's slices, not x's channels (k slices of"
                    f" {channels} image channels give x k x {channels}){example}"
                ) from None
            raise
        super().__init__(cfg, dataset_dicts, is_test, shuffle, drop_last, batch_size, **sharding)

    def build_elements(self) -> Sequence[Element]:
        self._check_one_slice_shape()
        return [
            Element(
                scan.index,
                ((0, scan.shape[0]), (0, scan.shape[1]), neighbour_window(z, self.window)),
                ((0, scan.shape[0]), (0, scan.shape[1]), (z, z + 1)),
            )
            for scan in self.scans
            for z in scan.slices
        ]
