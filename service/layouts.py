"""Chunk-shape presets for ``scancache preprocess --layout``, chosen from the access pattern.

Read amplification (decoded bytes / delivered bytes, image + merged mask through the label map)
is a property of geometry alone; the times are one 384x384x160 scan, cold reads (no chunk
cache), measured on the shared 2-core VM (docs/tuning.md, "Chunk shape by access pattern"):

=========  ===========  ==========================  =============================  ============
preset     inner chunk  2D batch of 16: amp / ms     4 patches 64x64x32: amp / ms   write (1 scan)
=========  ===========  ==========================  =============================  ============
patches    96x96x8      4.4 / 40-63                  4.1 / 6-11                     1.7-3.7 s
balanced   64x64x2      1.1 / 26                     2.2 / 12                       7.3 s
slices     whole x 1    0.56 / 12                    20 / 21                        6.8 s
=========  ===========  ==========================  =============================  ============

``patches`` stays the default: it writes fastest (the conversion target) and reads 3D patches
fastest; ``balanced`` meets every read-amplification target of issue 9 at some cost in patch
time and write time; ``slices`` is for 2D/2.5D-only training.
"""

from __future__ import annotations

LAYOUTS = {
    "patches": "96,96,8",
    "balanced": "64,64,2",
    "slices": "4096,4096,1",  # capped to the volume: one chunk a whole slice
}
DEFAULT_LAYOUT = "patches"


def chunks_text(layout: str | None, chunks: str | None) -> str:
    """The ``--chunks`` text for ``--layout NAME`` or ``--chunks Y,X,Z`` (not both)."""
    if layout is not None and chunks is not None:
        raise ValueError("give --layout or --chunks, not both")
    if chunks is not None:
        return chunks
    name = layout or DEFAULT_LAYOUT
    if name not in LAYOUTS:
        raise ValueError(f"--layout: {name!r} is not one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
