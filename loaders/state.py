"""``LoaderState``: where a loader stands, as plain JSON (``loader.state_dict()``).

Since the epoch order and every random draw are pure functions of ``(seed, epoch)``
(``loaders.ordering``, ``loaders.sampling``), a seed, an epoch and a position in it are all a
loader needs to give exactly the batches still to come. The rest guards against restoring
into a different set-up: the loader class, the shard, the epoch's length, the data set (a
fingerprint of its scans) and the settings that decide the batches (batch_size, shuffle,
drop_last and the loader's ``batch_fields`` of the config). States written before the
fingerprint and the settings existed still load; they are checked on the rest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loaders.config import MAX_SEED

STATE_VERSION = 1


def plain_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing with a state."""
    return json.loads(json.dumps(value, default=str))


def dataset_fingerprint(scans: Sequence[Any]) -> str:
    """What identifies a loader's data set: per scan (in order) its id, shape, classes, the
    slices used and its source ``fingerprint`` attribute (changes with the scan's source
    files). Not where it is read from: a state saved on a local store resumes over HTTP."""
    described = [
        [s.scan_id, list(s.meta.shape), s.meta.num_classes, list(s.slices), s.meta.attrs.get("fingerprint")]
        for s in scans
    ]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class LoaderState:
    loader: str
    seed: int
    epoch: int
    position: int  # batches of the epoch already delivered
    num_replicas: int
    rank: int
    num_batches: int
    # The number of reader processes whose delivery order ``position`` counts in (torch
    # DataLoader workers: loaders.ordering.worker_batches); 1 for the loader's own order.
    workers: int = 1
    # dataset_fingerprint of the scans, and their number (None: a state from before them)
    dataset: str | None = None
    scans: int | None = None
    # {"batch_size": ..., "shuffle": ..., "drop_last": ..., "<config field>": ...}, plain JSON
    settings: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"scancache_loader_state": STATE_VERSION, **asdict(self)}

    @staticmethod
    def parse(state: Any) -> LoaderState:
        """A state from ``to_dict`` (e.g. read back from JSON); anything else in one line."""
        if not isinstance(state, dict) or state.get("scancache_loader_state") != STATE_VERSION:
            raise ValueError("load_state_dict: not a scancache loader state (from loader.state_dict())")
        try:
            dataset, scans, settings = state.get("dataset"), state.get("scans"), state.get("settings")
            if dataset is not None and not isinstance(dataset, str):
                raise TypeError("'dataset'")
            if settings is not None and not isinstance(settings, dict):
                raise TypeError("'settings'")
            return LoaderState(
                str(state["loader"]),
                int(state["seed"]),
                int(state["epoch"]),
                int(state["position"]),
                int(state["num_replicas"]),
                int(state["rank"]),
                int(state["num_batches"]),
                int(state.get("workers", 1)),
                dataset,
                None if scans is None else int(scans),
                settings,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"load_state_dict: the state lacks or garbles {exc}") from None

    def check_matches(self, mine: LoaderState) -> None:
        """Refuse a state of another loader class, shard, data set or batch settings, or one
        out of range (one line naming the field). Changes nothing."""
        for key in ("loader", "num_replicas", "rank"):
            theirs, ours = getattr(self, key), getattr(mine, key)
            if theirs != ours:
                raise ValueError(
                    f"load_state_dict: the state is for {key}={theirs!r}, this loader has {ours!r}"
                )
        if self.dataset is not None and self.dataset != mine.dataset:
            raise ValueError(
                f"load_state_dict: the state is of another data set ({self.scans} scans, fingerprint "
                f"{self.dataset[:12]}; this loader has {mine.scans} scans, {str(mine.dataset)[:12]}): "
                "the scans, their slices, their source versions or their stored layouts differ"
            )
        theirs_settings, our_settings = self.settings or {}, mine.settings or {}
        for key in sorted(set(theirs_settings) & set(our_settings)):
            if theirs_settings[key] != our_settings[key]:
                raise ValueError(
                    f"load_state_dict: the state is for {key}={theirs_settings[key]!r}, "
                    f"this loader has {our_settings[key]!r}"
                )
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"load_state_dict: seed {self.seed} is outside 0..2**63-1")
        if self.epoch < 0:
            raise ValueError(f"load_state_dict: epoch {self.epoch} is negative")
        if self.workers < 1:
            raise ValueError(f"load_state_dict: workers {self.workers} must be at least 1")

    def check_length(self, num_batches: int) -> None:
        """The state's epoch, as this loader would make it: same length, position within it."""
        if self.num_batches != num_batches:
            raise ValueError(
                f"load_state_dict: the state's epoch has {self.num_batches} batches, this loader "
                f"{num_batches}: the data set or batch settings changed"
            )
        if not 0 <= self.position <= num_batches:
            raise ValueError(f"load_state_dict: position {self.position} is outside 0..{num_batches}")
