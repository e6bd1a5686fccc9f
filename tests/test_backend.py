"""Issue 21 items 8 and 9b/c: the Keras backend on a machine without TensorFlow, a quiet and
lazy ``import loaders``. Each case runs in a fresh interpreter with its own HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A torch-only machine: tensorflow is not found (find_spec gives None, import raises
# ModuleNotFoundError), as where it was never installed.
HIDE_TENSORFLOW = """
import importlib.machinery as machinery
import sys


class _HidingPathFinder(machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return None
        return machinery.PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [_HidingPathFinder if f is machinery.PathFinder else f for f in sys.meta_path]
"""


def run_python(tmp_path, code, hide_tensorflow=False, **env_overrides):
    """``code`` in a fresh interpreter: HOME is ``tmp_path/home``, no KERAS_* / TF_CPP_* set."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    path = [str(ROOT)]
    if hide_tensorflow:
        blocker = tmp_path / "hide_tf"
        blocker.mkdir(exist_ok=True)
        (blocker / "sitecustomize.py").write_text(HIDE_TENSORFLOW)
        path.insert(0, str(blocker))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERAS_", "TF_CPP_"))}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join(path), **env_overrides)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
    )


USE_KERAS = "from loaders import build_loader; import keras, sys; print(keras.backend.backend(), 'tensorflow' in sys.modules)"


def test_torch_only_machine_imports_twice_and_writes_no_tensorflow_keras_json(tmp_path):
    keras_json = tmp_path / "home" / ".keras" / "keras.json"
    for attempt in range(2):  # the second import reads what the first one left behind
        out = run_python(tmp_path, USE_KERAS, hide_tensorflow=True)
        assert out.returncode == 0, f"import {attempt + 1}: {out.stderr[-2000:]}"
        assert out.stdout.split() == ["torch", "False"]
        assert json.loads(keras_json.read_text())["backend"] == "torch"


def test_torch_only_machine_with_a_keras_json_naming_tensorflow_says_what_to_do(tmp_path):
    keras_json = tmp_path / "home" / ".keras" / "keras.json"
    keras_json.parent.mkdir(parents=True)
    keras_json.write_text(json.dumps({"backend": "tensorflow"}))
    out = run_python(tmp_path, USE_KERAS, hide_tensorflow=True)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "Keras backend 'tensorflow' is selected" in last and str(keras_json) in last
    assert '".[loaders]"' in last and "torch (installed)" in last
    assert json.loads(keras_json.read_text()) == {"backend": "tensorflow"}, "the user's file is left alone"
    # KERAS_BACKEND wins over keras.json
    out = run_python(tmp_path, USE_KERAS, hide_tensorflow=True, KERAS_BACKEND="torch")
    assert out.returncode == 0 and out.stdout.split() == ["torch", "False"], out.stderr[-2000:]
