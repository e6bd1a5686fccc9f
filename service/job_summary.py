"""What a preprocessing job reports: each scan's result (small: it travels from a Dask worker
to the client), the job's summary and its progress line or bar."""

from __future__ import annotations

from dataclasses import dataclass, field

from store.units import count_of, format_bytes

CONVERTED, SKIPPED, FAILED = "converted", "skipped", "failed"


@dataclass(frozen=True)
class ScanResult:
    """What one task reports back (small: it travels from the worker to the client)."""

    scan_id: str
    status: str  # converted / skipped / failed
    message: str = ""  # for failures: "scan: file: why"
    bytes_in: int = 0
    bytes_out: int = 0
    worker: str = ""
    warning: str = ""  # e.g. non-finite voxels: converted exactly, but worth knowing


@dataclass
class Summary:
    converted: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    results: list[ScanResult] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # scans in the store whose sources are gone
    pruned: bool = False  # whether the orphans were removed
    prune_kept: list[str] = field(default_factory=list)  # orphans --prune failed to remove (upkeep)
    prune_withheld: bool = False  # --prune given, but a source folder was not read
    removed_versions: int = 0
    # the store's upkeep after the scans (removing its lock, old versions, orphans) that failed:
    # said after the scans' report, never in place of it
    upkeep_failures: list[str] = field(default_factory=list)
    # upkeep left undone that costs room only (another user's old versions on a shared store)
    upkeep_left: list[str] = field(default_factory=list)

    def add(self, result: ScanResult) -> None:
        self.results.append(result)
        setattr(self, result.status, getattr(self, result.status) + 1)
        self.bytes_in += result.bytes_in
        self.bytes_out += result.bytes_out

    @property
    def total(self) -> int:
        return self.converted + self.skipped + self.failed

    def warnings(self) -> list[str]:
        return sorted(r.warning for r in self.results if r.warning)

    def progress_note(self) -> str:
        """How the job stands, for its progress line."""
        return f"converted {self.converted}, skipped {self.skipped}, failed {self.failed}"

    def failures(self) -> list[str]:
        """The failure lines (``scan: file: why``), sorted."""
        return sorted(r.message for r in self.results if r.status == FAILED)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.upkeep_failures else 0

    def __str__(self) -> str:
        return (
            f"{self.converted} converted, {self.skipped} skipped, {self.failed} failed; "
            f"{format_bytes(self.bytes_in)} read, {format_bytes(self.bytes_out)} written in {self.seconds:.1f} s"
        )

    def report(self) -> str:
        lines = [
            f"scans: {self.converted} converted, {self.skipped} skipped, {self.failed} failed "
            f"in {self.seconds:.1f} s",
            f"bytes: {format_bytes(self.bytes_in)} read, {format_bytes(self.bytes_out)} written",
        ]
        if self.removed_versions:  # what the grace period let go: room given back
            lines.append(
                f"old versions: {self.removed_versions} removed (superseded longer than the grace period)"
            )
        if self.warnings():
            lines.append(f"warnings ({len(self.warnings())}):")
            lines.extend(f"  {message}" for message in self.warnings())
        if self.orphans:
            if self.pruned:
                lines.append(f"removed {count_of(len(self.orphans), 'scan')} whose sources are gone:")
            else:
                why = (
                    "kept: --prune waits until every source folder is read; see the failures"
                    if self.prune_withheld
                    else "kept; --prune removes them"
                )
                lines.append(
                    f"{count_of(len(self.orphans), 'scan')} in the store {'has' if len(self.orphans) == 1 else 'have'} no source any more "
                    f"({why}):"
                )
            lines.extend(f"  {scan_id}" for scan_id in self.orphans)
        if self.prune_kept:
            lines.append(
                f"{count_of(len(self.prune_kept), 'scan')} whose sources are gone could not be removed "
                "(see the store upkeep below):"
            )
            lines.extend(f"  {scan_id}" for scan_id in self.prune_kept)
        if self.failed:
            lines.append(f"failures ({self.failed}):")
            lines.extend(f"  {message}" for message in self.failures())
        if self.upkeep_left:
            lines.append(
                f"store upkeep left undone ({len(self.upkeep_left)}; it takes room, nothing reads it):"
            )
            lines.extend(f"  {message}" for message in self.upkeep_left)
        if self.upkeep_failures:
            lines.append(f"store upkeep failed ({len(self.upkeep_failures)}):")
            lines.extend(f"  {message}" for message in self.upkeep_failures)
        return "\n".join(lines)
