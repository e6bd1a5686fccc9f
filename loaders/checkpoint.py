"""``LoaderCheckpoint``: a Keras callback that keeps a loader's state beside the model's checkpoints.

With ``keras.callbacks.BackupAndRestore(backup_dir)`` an interrupted ``fit`` resumes at the
epoch it was in, from that epoch's first step, with the weights of the last backup. For the
data to resume exactly too, the loader must be in that same epoch, with the same seed (also a
random one, ``SEED=None``). This callback

* writes ``loader.state_dict()`` (seed, epoch, position, shard) to ``<directory>/<name>`` (one
  file per rank for a sharded loader: :func:`state_file_name`) when
  training begins and after every Keras epoch (written to a temporary file, then renamed:
  never half a file), i.e. where the loader stands when the next Keras epoch begins;
* restores it when training begins, if the file exists,

so the Keras epoch that ``BackupAndRestore`` repeats gets exactly the batches an uninterrupted
run gave it. A Keras epoch is usually one pass over the loader (the position saved is then 0);
with ``fit(steps_per_epoch=k)`` shorter than a pass it is the next k batches of the pass, and
the position saved says where they start.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from loaders.backend import import_keras

import_keras()  # chooses the backend before Keras' first import (loaders.backend)

import keras  # noqa: E402

STATE_FILE = "scancache_loader_state.json"


def state_file_name(loader: Any) -> str:
    """``scancache_loader_state.json``; a loader that is one shard of several
    (``num_replicas`` > 1, each rank its own state) ``scancache_loader_state.rank<r>.json``, so
    ranks sharing one backup folder do not read each other's state."""
    shard = getattr(loader, "shard", None)
    if shard is None or shard.num_replicas <= 1:
        return STATE_FILE
    return f"scancache_loader_state.rank{shard.rank}.json"


class LoaderCheckpoint(keras.callbacks.Callback):
    """``LoaderCheckpoint(train_loader, backup_dir)``, next to ``BackupAndRestore(backup_dir)``.
    ``name``: the state's file in ``backup_dir`` (default :func:`state_file_name`)."""

    def __init__(self, loader: Any, directory: str | os.PathLike[str], name: str | None = None) -> None:
        super().__init__()
        self.loader = loader
        self.path = Path(directory) / (name or state_file_name(loader))
        # a sharded loader's state that an older scancache wrote under the one name
        self._legacy = (
            self.path.with_name(STATE_FILE) if name is None and self.path.name != STATE_FILE else None
        )
        self._steps = 0  # steps Keras has trained in this epoch

    def _save(self, trained: int | None = None) -> None:
        """The loader's state; ``trained``: the batches Keras trained on in this epoch, which
        set where the next one begins when the read-ahead (tf.data's prefetch) ran further."""
        state = self.loader.state_dict()
        if trained is not None and state["position"] > 0:
            reached = self.loader._begin_position + trained
            passes, state["position"] = divmod(reached, len(self.loader))
            state["epoch"] = self.loader._begin_epoch + passes
        # a name of this process's own: another user's leftover in a shared folder is not ours to
        # replace (a sticky /tmp-like folder refuses it)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)
        except OSError as err:  # a full disk: the last state stays whole, no .tmp is left, the file named
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise OSError(
                err.errno,
                f"LoaderCheckpoint could not save the loader's state: {err.strerror}",
                str(self.path),
            ) from None

    def _saved(self) -> tuple[Path, dict[str, Any]] | None:
        """The state to restore: this loader's file; for a sharded loader without one, a state
        an older scancache wrote under the one name for every rank, if it is this rank's (another
        rank's is refused: this rank starting afresh would read other examples than its peers)."""
        for path in (self.path, self._legacy):
            if path is None or not path.is_file():
                continue
            try:
                state = json.loads(path.read_text())
            except ValueError:
                raise ValueError(f"LoaderCheckpoint: {path.name} is not a loader state (not JSON)") from None
            rank = self.loader.shard.rank
            if path == self.path or (isinstance(state, dict) and state.get("rank") == rank):
                return path, state
            raise ValueError(
                f"LoaderCheckpoint: {path} holds rank {state.get('rank') if isinstance(state, dict) else '?'}'s "
                f"state (an older scancache kept one file for all ranks), not rank {rank}'s; "
                f"restore each rank from its own file ({self.path.name}) or remove it to start afresh"
            )
        return None

    def on_train_begin(self, logs: Any = None) -> None:
        saved = self._saved()
        if saved is not None:
            path, state = saved
            try:
                self.loader.load_state_dict(state)
            except ValueError as exc:  # refused, the loader unchanged and the file kept
                raise ValueError(f"LoaderCheckpoint: {path.name}: {exc}") from None
        self._save()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._steps = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._steps = int(batch) + 1  # Keras passes the last step of the execution

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        # Keras has ended the loader's pass (position 0) or, an epoch of steps_per_epoch shorter
        # than a pass, left it to go on: then the pass stands where Keras' steps got to, not
        # where the read-ahead (tf.data's prefetch) did
        self._save(self._steps)
