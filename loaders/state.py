"""``LoaderState``: where a loader stands, as plain JSON (``loader.state_dict()``).

Since the epoch order and every random draw are pure functions of ``(seed, epoch)``
(``loaders.ordering``, ``loaders.sampling``), a seed, an epoch and a position in it are all a
loader needs to give exactly the batches still to come; the shard and the epoch's length guard
against restoring into a different set-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

STATE_VERSION = 1


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

    def to_dict(self) -> dict[str, Any]:
        return {"scancache_loader_state": STATE_VERSION, **asdict(self)}

    @staticmethod
    def parse(state: Any) -> LoaderState:
        """A state from ``to_dict`` (e.g. read back from JSON); anything else in one line."""
        if not isinstance(state, dict) or state.get("scancache_loader_state") != STATE_VERSION:
            raise ValueError("load_state_dict: not a scancache loader state (from loader.state_dict())")
        try:
            return LoaderState(
                str(state["loader"]),
                int(state["seed"]),
                int(state["epoch"]),
                int(state["position"]),
                int(state["num_replicas"]),
                int(state["rank"]),
                int(state["num_batches"]),
                int(state.get("workers", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"load_state_dict: the state lacks or garbles {exc}") from None

    def check_matches(self, mine: LoaderState) -> None:
        """Refuse a state of another loader class or shard (one line naming the field)."""
        for key in ("loader", "num_replicas", "rank"):
            theirs, ours = getattr(self, key), getattr(mine, key)
            if theirs != ours:
                raise ValueError(
                    f"load_state_dict: the state is for {key}={theirs!r}, this loader has {ours!r}"
                )
        if self.epoch < 0:
            raise ValueError(f"load_state_dict: epoch {self.epoch} is negative")
        if self.workers < 1:
            raise ValueError(f"load_state_dict: workers {self.workers} must be at least 1")

    def check_length(self, num_batches: int) -> None:
        """After moving to the state's epoch: same length, position within it."""
        if self.num_batches != num_batches:
            raise ValueError(
                f"load_state_dict: the state's epoch has {self.num_batches} batches, this loader "
                f"{num_batches}: the data set or batch settings changed"
            )
        if not 0 <= self.position <= num_batches:
            raise ValueError(f"load_state_dict: position {self.position} is outside 0..{num_batches}")
