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
    assert '"scancache[loaders]"' in last and "torch (installed)" in last
    assert json.loads(keras_json.read_text()) == {"backend": "tensorflow"}, "the user's file is left alone"
    # KERAS_BACKEND wins over keras.json
    out = run_python(tmp_path, USE_KERAS, hide_tensorflow=True, KERAS_BACKEND="torch")
    assert out.returncode == 0 and out.stdout.split() == ["torch", "False"], out.stderr[-2000:]


HEAVY = ("keras", "tensorflow", "torch", "jax")


def test_import_loaders_imports_no_keras_nor_a_backend(tmp_path):
    code = (
        "import sys, loaders\n"
        "from loaders import Config, DatasetCatalog\n"
        "cfg = Config(SEED=1, IMG_SIZE=(8, 8, 1))\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "from loaders import build_loader, DefaultDataLoader, LOADER_REGISTRY\n"
        "print('keras' in sys.modules, 'DefaultDataLoader' in LOADER_REGISTRY)\n"
    )
    out = run_python(tmp_path, code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["[]", "True True"]


def test_an_unknown_name_is_an_attribute_error(tmp_path):
    out = run_python(tmp_path, "import loaders; loaders.NoSuch")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == "AttributeError: module 'loaders' has no attribute 'NoSuch'"


STARTUP = ("I0000", "W0000", "absl::InitializeLog", "port.cc", "cudart_stub")


def test_tensorflow_starts_quietly_but_a_level_the_user_set_is_kept(tmp_path):
    code = (
        "from loaders import build_loader; import os, tensorflow; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    )
    out = run_python(tmp_path, code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2"]
    assert not [line for line in out.stderr.splitlines() if any(s in line for s in STARTUP)], out.stderr
    out = run_python(tmp_path, code, TF_CPP_MIN_LOG_LEVEL="0")
    assert out.returncode == 0 and out.stdout.split() == ["0"], out.stderr[-2000:]
    # a spawned torch worker inherits the level the parent's loaders set: still quiet
    inherited = {"TF_CPP_MIN_LOG_LEVEL": "2", "SCANCACHE_SET_TF_LOG_LEVEL": "1"}
    out = run_python(tmp_path, code, **inherited)
    assert out.returncode == 0 and out.stdout.split() == ["2"], out.stderr[-2000:]
    assert not [line for line in out.stderr.splitlines() if any(s in line for s in STARTUP)], out.stderr


def test_the_quiet_import_passes_on_everything_but_the_start_up_lines(tmp_path):
    code = (
        "import os\n"
        "from loaders import backend\n"
        "with backend._quiet_startup():\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "    os.write(2, b'I0000 00:00:1796419795.537521   17918 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "    os.write(2, b'E0000 00:00:1796419802.511123   18006 cuda_platform.cc:52] failed call to cuInit\\n')\n"
        "    os.write(2, b'E0000 00:00:1796419802.5   18006 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\\n')\n"
        "    os.write(2, b'a real message\\n')\n"
        "print('done')\n"
    )
    out = run_python(tmp_path, code)
    assert out.returncode == 0 and out.stdout == "done\n"
    no_driver_line = "E0000 00:00:1796419802.5   18006 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"
    # the CUDA probe's error is left out where no NVIDIA driver is installed (nothing is wrong)
    kept = [no_driver_line] if os.path.exists("/dev/nvidiactl") else []
    assert out.stderr.splitlines() == [
        "E0000 00:00:1796419802.511123   18006 cuda_platform.cc:52] failed call to cuInit",
        *kept,
        "a real message",
    ]


def test_a_tf_dataset_on_a_machine_without_a_gpu_prints_no_cuda_error(tmp_path):
    code = "from loaders.backend import import_tensorflow\ntf = import_tensorflow()\nprint(int(tf.constant(1) + 1))\n"
    out = run_python(tmp_path, code)
    assert out.returncode == 0 and out.stdout.split() == ["2"], out.stderr[-2000:]
    if not os.path.exists("/dev/nvidiactl"):
        assert "cuInit" not in out.stderr, out.stderr


def test_loaders_import_without_a_writable_temporary_folder(tmp_path):
    """A container with a read-only root filesystem: filtering TensorFlow's start-up lines
    needs a file to hold them, and without one the import goes on unfiltered (it raised
    "No usable temporary directory found")."""
    code = (
        "import os, tempfile\n"
        "del os.memfd_create\n"
        "tempfile.tempdir = '/nonexistent/tmp'\n"
        "import loaders.backend as backend\n"
        "assert backend._capture_file() is None\n"
        "from loaders import build_loader, Config\n"
        "print('imported', Config is not None)\n"
    )
    result = run_python(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("imported True")
