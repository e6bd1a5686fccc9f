"""Progress of long work, one reporter for every job: ``preprocess``, ``write_predictions`` and
the NIfTI export.

On a terminal or in a notebook it is a tqdm bar (where tqdm is installed: it comes with the
service extra; a loaders-only install falls back to lines). Elsewhere (a log file, CI, a job
scheduler) it is a plain line every few seconds and one at the end, so logs stay short and
readable. Quiet when disabled: normal operation prints nothing.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (output goes to a cell, not a terminal)."""
    return "ipykernel" in sys.modules


def interactive(stream: IO[str]) -> bool:
    """Whether a person watches ``stream``: a terminal, or a notebook's cell."""
    try:
        return stream.isatty() or in_notebook()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def _tqdm() -> Any:
    try:
        # tqdm's text bar, in a notebook too (its cell shows the redrawn line); tqdm.auto would
        # warn where ipywidgets is missing
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """``total`` items of work, ``done`` of them already; ``advance(note)`` as each one ends.

    ``label`` starts each plain line (``"preprocess: 12/48 scans (note)"``); ``unit`` names an
    item. ``enabled=None`` shows progress where a person watches (``interactive``)."""

    def __init__(
        self,
        total: int,
        *,
        label: str,
        unit: str = "scan",
        done: int = 0,
        enabled: bool | None = None,
        stream: IO[str] | None = None,
        every: float = 5.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.label, self.unit, self.every = total, done, label, unit, every
        watched = interactive(self.stream)
        # nothing to do shows nothing (a re-run that skips every scan)
        self.enabled = total > done and (watched if enabled is None else bool(enabled))
        self.last = time.monotonic()
        self.bar: Any = None
        tqdm = _tqdm() if self.enabled and watched else None
        if tqdm is not None:
            self.bar = tqdm(total=total, initial=done, unit=unit, file=self.stream, dynamic_ncols=True)

    def advance(self, note: str = "") -> None:
        """One more item done; ``note`` says how things stand (or which item it was)."""
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            units = self.unit if self.total == 1 else f"{self.unit}s"
            shown = f" ({note})" if note else ""
            print(f"{self.label}: {self.done}/{self.total} {units}{shown}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
