"""Chunk-shape presets for ``scancache preprocess --layout``, chosen from the access pattern.

Read amplification (decoded bytes / delivered bytes, image + merged mask through the label map)
is a property of geometry alone; the times are one 384x384x160 scan, cold reads (no chunk
cache), measured on the shared 2-core VM (docs/tuning.md, "Chunk shape by access pattern"):

=========  ===========  ==========================  =============================  ============
preset     inner chunk  2D batch of 16: amp / ms     4 patches 64x64x32: amp / ms   write (1 scan)
=========  ===========  ==========================  =============================  ============
patches    64x64x8      4.4 per slice / 0.56 blocks  2.6 (96x96x8: 4.0)             2.2-2.6 s
balanced   64x64x2      1.1 / 26                     2.2 / 12                       7.3 s
slices     whole x 1    0.56 / 12                    20 / 21                        6.8 s
=========  ===========  ==========================  =============================  ============

``patches`` is the default. It was 96x96x8 until 2026-12-03; 64x64x8 reads 3D patches and 2D
blocks as fast (real scale, alternating epochs: 64x64x32 patches 181-223 vs 173-200 a second,
2D 390-691 vs 432-734 slices/s), writes within 2-6 % (2.19-2.55 s vs 2.14-2.41 s a scan) and
brings patch read amplification under 3 (2.64 / 2.43 for 64x64x32 / 64^3, from 4.02 / 3.74).
The slice loaders read chunk-deep blocks (loaders/blocks.py), so the 8-deep chunks cost 2D
nothing. ``balanced`` trades patch and write time for per-slice reads; ``slices`` is for
2D/2.5D-only training.
"""

from __future__ import annotations

LAYOUTS: dict[str, tuple[int, int, int]] = {
    "patches": (64, 64, 8),
    "balanced": (64, 64, 2),
    "slices": (4096, 4096, 1),  # capped to the volume: one chunk a whole slice
}
DEFAULT_LAYOUT = "patches"


def chosen_chunks(layout: str | None, chunks: str | None) -> str | tuple[int, int, int]:
    """What ``ChunkLayout.parse`` takes for ``--layout NAME`` (the preset's shape) or
    ``--chunks Y,X,Z`` (the text as given; not both)."""
    if layout is not None and chunks is not None:
        raise ValueError("give --layout or --chunks, not both")
    if chunks is not None:
        return chunks
    name = layout or DEFAULT_LAYOUT
    if name not in LAYOUTS:
        raise ValueError(f"--layout: {name!r} is not one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def chunks_text(layout: str | None, chunks: str | None) -> str:
    """The ``--chunks`` text ``--layout NAME`` stands for (``64,64,8``), or ``chunks`` as given."""
    chosen = chosen_chunks(layout, chunks)
    return chosen if isinstance(chosen, str) else ",".join(map(str, chosen))
