"""Keras and its backend, imported once and only when a loader needs them (``import_keras``).

* **The backend.** Keras defaults to TensorFlow (the ``loaders`` extra). A backend the user
  chose (``KERAS_BACKEND``, or ``keras.json``) is never overridden. Where none was chosen and
  TensorFlow is absent, an installed one is used (jax, else torch): ``KERAS_BACKEND`` is set
  before Keras is imported, and ``keras.json`` is written with it. Keras would otherwise write
  ``keras.json`` naming TensorFlow on its first import, and every later import on a torch-only
  machine would then ask for TensorFlow. Where the needed backend is missing: one line naming
  the extra to install.
* **Quiet.** TensorFlow's C++ start-up lines (oneDNN, CUDA probing) are left out unless the
  user set ``TF_CPP_MIN_LOG_LEVEL``: setting it in this process before the import does not
  reach them (TensorFlow 2.21 logs them while its libraries load), so they are filtered from
  what the import writes to stderr; everything else it writes is passed on. The first device
  query runs there too, so that a machine without an NVIDIA driver does not get TensorFlow's
  "failed call to cuInit" error line at the first batch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import IO

BACKEND_EXTRAS = {"tensorflow": "loaders", "torch": "torch", "jax": "jax"}
# Keras' order of preference after its default, TensorFlow
FALLBACK_BACKENDS = ("jax", "torch")

# Whether the user set the level (then TensorFlow's start-up lines are theirs to see); if not,
# it is 2 (warnings off) for this process and its children. A child (a spawned torch worker)
# inherits the variable, so a marker says it was ours and the child filters the lines too:
# TensorFlow 2.21 prints its start-up lines whatever the level says.
_OURS = "SCANCACHE_SET_TF_LOG_LEVEL"
USER_TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL" in os.environ and os.environ.get(_OURS) != "1"
if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    os.environ[_OURS] = "1"

# absl/TSL start-up lines: "I0000 00:00:1796419795.537521   17918 port.cc:153] ..." (info and
# warning levels) and absl's notice before them
_STARTUP_LINE = re.compile(
    rb"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] .*"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR)$"
)
# On a machine without an NVIDIA driver (no /dev/nvidiactl) TensorFlow's first device query
# logs this at error level though nothing is wrong: there is no GPU to initialise. With a driver
# present the line is kept, as a broken driver's sign.
_NO_DRIVER_LINE = re.compile(
    rb"^E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*$"
)
_import_lock = threading.Lock()


def keras_dir() -> str:
    """Where Keras keeps ``keras.json`` (as Keras computes it)."""
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    home = os.path.expanduser("~")
    return os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")


def _keras_json_backend() -> str | None:
    try:
        with open(os.path.join(keras_dir(), "keras.json")) as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return str(backend) if backend else None


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses it: not usable here
        return False


def _write_keras_json(backend: str) -> None:
    """Keras' own default ``keras.json``, with ``backend`` (Keras would write TensorFlow)."""
    folder = keras_dir()
    path = os.path.join(folder, "keras.json")
    config = {"floatx": "float32", "epsilon": 1e-07, "backend": backend, "image_data_format": "channels_last"}
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "x") as f:  # never replaces one that appeared meanwhile
            f.write(json.dumps(config, indent=4))
    except OSError:  # not writable, or written by another process: Keras reads what is there
        pass


def choose_backend() -> str:
    """The backend Keras will use, set up before Keras is imported (module docstring)."""
    chosen: str | None
    if os.environ.get("KERAS_BACKEND"):
        chosen, where = os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    else:
        chosen, where = _keras_json_backend(), os.path.join(keras_dir(), "keras.json")
    if chosen is not None:
        if chosen in BACKEND_EXTRAS and not installed(chosen):
            others = [b for b in BACKEND_EXTRAS if b != chosen and installed(b)]
            instead = f", or choose {' or '.join(others)} (installed) in {where}" if others else ""
            raise ImportError(
                f"Keras backend {chosen!r} is selected ({where}) but not installed: "
                f'pip install "scancache[{BACKEND_EXTRAS[chosen]}]"{instead}'
            )
        return chosen
    if installed("tensorflow"):
        return "tensorflow"
    for name in FALLBACK_BACKENDS:
        if installed(name):
            os.environ["KERAS_BACKEND"] = name
            _write_keras_json(name)
            return name
    raise ImportError(
        'no Keras backend is installed: pip install "scancache[loaders]" (TensorFlow), or'
        ' "scancache[torch]" / "scancache[jax]" (in a checkout: pip install -e ".[loaders]")'
    )


@contextlib.contextmanager
def _quiet_startup() -> Iterator[None]:
    """Leave TensorFlow's C++ start-up lines out of what the block writes to stderr (fd 2)."""
    if USER_TF_LOG_LEVEL or "tensorflow" in sys.modules:
        yield
        return
    captured_file = _capture_file()
    if captured_file is None:  # nowhere to hold the lines: leave them all (never fail the import)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with captured_file as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            patterns = [_STARTUP_LINE] + ([] if os.path.exists("/dev/nvidiactl") else [_NO_DRIVER_LINE])
            rest = b"".join(
                line for line in lines if not any(p.match(line.rstrip(b"\r\n")) for p in patterns)
            )
            while rest:
                rest = rest[os.write(2, rest) :]


def _capture_file() -> IO[bytes] | None:
    """An anonymous file in memory (Linux), else a temporary file; None where neither can be
    made (a read-only root filesystem without a writable temporary folder)."""
    try:
        return os.fdopen(os.memfd_create("scancache-startup-lines"), "w+b")
    except (AttributeError, OSError):
        pass
    try:
        return tempfile.TemporaryFile()
    except OSError:
        return None


def import_keras() -> ModuleType:
    """``keras``, with its backend chosen first (module docstring)."""
    with _import_lock:
        if "keras" not in sys.modules:
            backend = choose_backend()
            with _quiet_startup() if backend == "tensorflow" else contextlib.nullcontext():
                importlib.import_module("keras")
                if backend == "tensorflow":
                    _probe_devices()
    return sys.modules["keras"]


def import_tensorflow() -> ModuleType:
    """``tensorflow`` (for ``as_tf_dataset``), as quiet as Keras' import of it."""
    with _import_lock:
        if "tensorflow" not in sys.modules:
            with _quiet_startup():
                importlib.import_module("tensorflow")
                _probe_devices()
    return sys.modules["tensorflow"]


def _probe_devices() -> None:
    """TensorFlow's first device query, inside the quiet block: it is what probes CUDA."""
    sys.modules["tensorflow"].config.list_physical_devices()
