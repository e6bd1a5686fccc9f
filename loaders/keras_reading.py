"""Keras' own reading options of a ``PyDataset`` (``workers``, ``use_multiprocessing``,
``max_queue_size``), kept off for scancache's loaders.

A loader serves a Keras epoch's batches in its own order, one caller after the other, and reads
ahead itself (``cfg.NUM_WORKERS`` reading processes, ``cfg.PREFETCH_BATCHES`` batches ahead).
Keras' thread or process pool would fetch batches out of that order, and its queue keeps the
batches fetched for the input spec into the next run: examples repeated and skipped in silence,
a loader state that never moves (each forked process has its own). So the options are refused,
in one line saying what to set instead, wherever they come in: ``build_loader(...,
workers=2)`` or ``loader.workers = 2`` (Keras 3's way, since ``fit(workers=...)`` is gone).
"""

from __future__ import annotations

from typing import Any

INSTEAD = (
    "this loader reads ahead itself, in the order it serves its batches (Keras' own threads or"
    " processes would repeat and skip examples): set cfg.NUM_WORKERS (reading processes) and"
    " cfg.PREFETCH_BATCHES (batches read ahead) instead"
)
KERAS_READING_ARGS = ("workers", "use_multiprocessing", "max_queue_size")


def refuse_keras_reading(name: str, value: Any) -> None:
    """Refuse a Keras reading option other than its harmless values, in one line."""
    harmless = {
        "workers": value in (0, 1) and not isinstance(value, float),
        "use_multiprocessing": value is False or value == 0,
        "max_queue_size": True,  # only Keras' own pool reads it, and that stays off
    }
    if not harmless.get(name, False):
        raise ValueError(f"{name}={value!r}: {INSTEAD}")


class KerasReadingOptions:
    """``PyDataset``'s ``workers`` and ``use_multiprocessing`` that stay off: set to anything
    else they refuse at once, rather than when ``fit`` has already mixed the epoch up."""

    _workers: int
    _use_multiprocessing: bool

    @property
    def workers(self) -> int:
        return self._workers

    @workers.setter
    def workers(self, value: int) -> None:
        refuse_keras_reading("workers", value)
        self._workers = int(value)

    @property
    def use_multiprocessing(self) -> bool:
        return self._use_multiprocessing

    @use_multiprocessing.setter
    def use_multiprocessing(self, value: bool) -> None:
        refuse_keras_reading("use_multiprocessing", value)
        self._use_multiprocessing = False
