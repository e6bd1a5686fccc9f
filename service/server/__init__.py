"""The scancache data server: FastAPI on uvicorn, serving one store read-only.

``run(store, ...)`` starts it (``scancache serve``); ``create_app(Settings(...))`` builds the
ASGI app for tests and embedding.
"""

from service.server.app import create_app
from service.server.runner import run
from service.server.settings import Settings

__all__ = ["Settings", "create_app", "run"]
