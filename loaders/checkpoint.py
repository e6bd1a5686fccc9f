"""``LoaderCheckpoint``: a Keras callback that keeps a loader's state beside the model's checkpoints.

With ``keras.callbacks.BackupAndRestore(backup_dir)`` an interrupted ``fit`` resumes at the
epoch it was in, from that epoch's first step, with the weights of the last backup. For the
data to resume exactly too, the loader must be in that same epoch, with the same seed (also a
random one, ``SEED=None``). This callback

* writes ``loader.state_dict()`` (seed, epoch, shard) to ``<directory>/<name>`` when training
  begins and after every epoch (written to a temporary file, then renamed: never half a file);
* restores it when training begins, if the file exists;
* at each epoch's start puts the loader at Keras' epoch number, from its first batch, so the
  epoch Keras repeats gets exactly the batches an uninterrupted run gave it.

Mid-epoch positions (``state_dict()["position"]``) are for your own loops, tf.data and torch:
Keras itself repeats an interrupted epoch from its start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loaders.backend import import_keras

import_keras()  # chooses the backend before Keras' first import (loaders.backend)

import keras  # noqa: E402

STATE_FILE = "scancache_loader_state.json"


class LoaderCheckpoint(keras.callbacks.Callback):
    """``LoaderCheckpoint(train_loader, backup_dir)``, next to ``BackupAndRestore(backup_dir)``."""

    def __init__(self, loader: Any, directory: str | os.PathLike[str], name: str = STATE_FILE) -> None:
        super().__init__()
        self.loader = loader
        self.path = Path(directory) / name

    def _save(self, epoch: int) -> None:
        state = self.loader.state_dict()
        state.update(epoch=int(epoch), position=0)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)

    def on_train_begin(self, logs: Any = None) -> None:
        if self.path.is_file():
            try:
                state = json.loads(self.path.read_text())
            except ValueError:
                raise ValueError(
                    f"LoaderCheckpoint: {self.path.name} is not a loader state (not JSON)"
                ) from None
            try:
                self.loader.load_state_dict(state)
            except ValueError as exc:  # refused, the loader unchanged and the file kept
                raise ValueError(f"LoaderCheckpoint: {self.path.name}: {exc}") from None
        self._save(self.loader.epoch)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.loader.set_epoch(int(epoch))

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._save(int(epoch) + 1)
