"""A realistic synthetic knee-like scan: nested ellipsoids as tissue classes plus noise.

Values are integer-valued float32 (MRI reconstructed from DICOM integers), the way slice-wise
MedSegPy datasets store them; the mask is one-hot over ``num_classes`` tissue classes with
spatially coherent blobs, so it compresses like a real segmentation, not like random bytes.
"""

from __future__ import annotations

import numpy as np


def phantom(
    shape: tuple[int, int, int] = (384, 384, 160), num_classes: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image float32 (H, W, D), mask uint8 (H, W, D, C))``."""
    rng = np.random.default_rng(seed)
    h, w, d = shape
    yy = (np.arange(h, dtype=np.float32) - h / 2)[:, None, None]
    xx = (np.arange(w, dtype=np.float32) - w / 2)[None, :, None]
    zz = (np.arange(d, dtype=np.float32) - d / 2)[None, None, :]
    labels = np.zeros(shape, dtype=np.int8)
    image = np.full(shape, 40.0, dtype=np.float32)
    for k in range(num_classes):
        cy, cx, cz = rng.uniform(-0.25, 0.25, 3) * np.array([h, w, d])
        ry, rx, rz = rng.uniform(0.08, 0.3, 3) * np.array([h, w, d])
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + ((zz - cz) / rz) ** 2 <= 1.0
        labels[inside] = k + 1
        image[inside] = 200.0 + 150.0 * k
    image += rng.normal(0.0, 25.0, size=shape).astype(np.float32)
    np.rint(image, out=image)
    np.clip(image, 0, None, out=image)
    mask = np.zeros((*shape, num_classes), dtype=np.uint8)
    for k in range(num_classes):
        mask[..., k] = labels == k + 1
    return image, mask
