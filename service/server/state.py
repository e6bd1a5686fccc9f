"""What a running app holds: its settings, the store reader and its metrics."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from service.server.inflight import InflightBudget
from service.server.metrics import Metrics
from service.server.settings import Settings
from store.source import LocalSource


@dataclass
class ServerState:
    settings: Settings
    source: LocalSource
    metrics: Metrics
    inflight: InflightBudget

    def store_readable(self) -> bool:
        """Whether the store's root is there (``/health``; an empty answer or a 404 from a store
        that is gone would tell a client the store is empty or the scan unknown)."""
        try:
            return self.source.storage.read("zarr.json") is not None
        except OSError:  # object storage unreachable
            return False


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the state ``create_app`` attached to the app."""
    state: ServerState = request.app.state.scancache
    return state
