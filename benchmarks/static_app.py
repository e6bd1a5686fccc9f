"""The static-file baseline server: ``BENCH_STATIC_DIR`` served as is (see servers.py)."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

app = Starlette(routes=[Mount("/", StaticFiles(directory=os.environ.get("BENCH_STATIC_DIR", ".")))])
