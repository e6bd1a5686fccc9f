"""Epochs and where a loader stands in one: Keras' epoch callbacks, ``set_epoch``, and the
state (``state_dict`` / ``load_state_dict``) from which a resumed run gets exactly the batches
still to come. Mixed into ``loaders.base.DataLoader``; the epoch's plan (order, blocks, batch
groups) is the loader's ``_make_plan``, a pure function of the seed and the epoch.
"""

from __future__ import annotations

import copy
import functools
import sys
import threading
import types
from typing import Any, Protocol

from loaders.config import Config
from loaders.ordering import Shard
from loaders.prefetch import Prefetcher
from loaders.scans import ScanEntry
from loaders.state import LoaderState, dataset_fingerprint, plain_json


class _Loader(Protocol):
    """What epochs and states use of the loader they belong to (``loaders.base.DataLoader``)."""

    _cfg: Config
    scans: list[ScanEntry]
    seed: int
    epoch: int
    shard: Shard
    batch_size: int
    shuffle: bool
    drop_last: bool
    batch_fields: tuple[str, ...]
    _plan: Any
    _position: int
    _position_workers: int
    _served: int
    _last_index: int
    _keras_epoch: bool
    _resume_pass: bool
    _begin_position: int
    _begin_epoch: int
    _serve_lock: threading.Lock
    _prefetcher: Prefetcher[Any, Any]

    def __len__(self) -> int: ...
    def _make_plan(self, epoch: int) -> Any: ...
    def _batches_in(self, plan: Any) -> int: ...
    def _use_plan(self, plan: Any, position: int = 0, position_workers: int = 1) -> None: ...
    def set_epoch(self, epoch: int) -> None: ...
    def batch_settings(self) -> dict[str, Any]: ...
    def _state(self) -> LoaderState: ...
    @property
    def dataset_fingerprint(self) -> str: ...


class EpochState:
    """Keras' epoch callbacks, ``set_epoch``, ``state_dict`` and ``load_state_dict``."""

    def on_epoch_begin(self: _Loader) -> None:
        """Keras calls this before an epoch: serve its batches in order, from the first, or from
        where the pass stands when Keras' epochs are shorter than a pass (``steps_per_epoch``)
        or a state was restored mid-pass."""
        with self._serve_lock:
            self._keras_epoch = True
            if not self._resume_pass:
                self._position, self._position_workers = 0, 1
            self._served = self._begin_position = self._position
            self._begin_epoch = self.epoch
            self._resume_pass = False

    def on_epoch_end(self: _Loader) -> None:
        """The next epoch once a pass is complete. When Keras calls it before that: after
        reading its first batches for the input spec (``EpochIterator.reset``) the pass starts
        again where it began; after an epoch of ``steps_per_epoch`` steps, fewer than a pass,
        the next Keras epoch goes on with the same pass, as Keras' own iterator does."""
        with self._serve_lock:
            keras_epoch, complete = self._keras_epoch, self._served >= len(self)
            self._keras_epoch = False
            begin = self._begin_position
        if not _called_from_keras() or (keras_epoch and complete):
            self.set_epoch(self.epoch + 1)
        elif _called_from_keras(function="reset"):
            # Keras read batches for its input spec. Inside an epoch they moved the pass: it
            # starts again where that epoch began. Outside one (TensorFlow probes before its
            # first epoch) the pass never moved: it goes on from where it stands (a previous
            # fit's last step, a restored state), and a resumed pass stays one.
            if keras_epoch:
                self._use_plan(self._plan, begin)
        elif keras_epoch and (
            _called_from_keras(function="evaluate") or _called_from_keras(function="predict")
        ):
            # evaluate(steps=k) or fit's validation_steps=k, shorter than the pass: Keras' own
            # iterator starts every evaluation at the same batch, so the next one starts where
            # this one began (not k batches on, less those tf.data read ahead)
            self._use_plan(self._plan, begin)
        else:
            with self._serve_lock:
                self._resume_pass = True

    def set_epoch(self: _Loader, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch (its order is a function of SEED and epoch)."""
        _refuse_during_a_pass(self, "set_epoch")
        if int(epoch) < 0:
            raise ValueError(f"epoch must not be negative, got {epoch}")
        self._use_plan(self._make_plan(int(epoch)))

    def _use_plan(self: _Loader, plan: Any, position: int = 0, position_workers: int = 1) -> None:
        self._plan = plan
        with self._serve_lock:
            self.epoch = plan[0]
            self._position, self._position_workers = position, position_workers
            self._served = 0
            self._last_index = -2
            self._resume_pass = position > 0  # a Keras epoch goes on from there

    def state_dict(self: _Loader) -> dict[str, Any]:
        """Where the loader stands, as plain JSON (``loaders.state``): restoring it gives exactly
        the batches still to come (seed, epoch, batches of it already delivered, shard)."""
        return self._state().to_dict()

    @functools.cached_property
    def dataset_fingerprint(self: _Loader) -> str:
        """What identifies this loader's data set in a state (``loaders.state.dataset_fingerprint``)."""
        return dataset_fingerprint(self.scans)

    def batch_settings(self: _Loader) -> dict[str, Any]:
        """The settings that decide the batches, as a state records them (plain JSON)."""
        settings = {"batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last}
        settings.update({name: getattr(self._cfg, name) for name in self.batch_fields})
        return dict(plain_json(settings))

    def _state(self: _Loader) -> LoaderState:
        shard = self.shard
        return LoaderState(
            type(self).__name__,
            int(self.seed),
            int(self.epoch),
            int(self._position),
            shard.num_replicas,
            shard.rank,
            len(self),
            int(self._position_workers),
            self.dataset_fingerprint,
            len(self.scans),
            self.batch_settings(),
        )

    def load_state_dict(self: _Loader, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of the same loader and data set).

        Everything is checked before anything changes: a refused state (another data set,
        other batch settings, another length) leaves the loader where it was."""
        _refuse_during_a_pass(self, "load_state_dict")
        restored = LoaderState.parse(state)
        restored.check_matches(self._state())
        # the state's epoch as this loader would make it under the state's seed, made on a
        # shallow copy (sharing scans and caches) so that this loader is untouched until it fits
        trial = copy.copy(self)
        trial.seed = restored.seed
        plan = trial._make_plan(restored.epoch)
        restored.check_length(self._batches_in(plan))
        self.seed = restored.seed
        self._use_plan(plan, restored.position, restored.workers)
        self._prefetcher.reset()


def _refuse_during_a_pass(loader: Any, what: str) -> None:
    """An iterator of this loader that is still open would go on with the batches it had
    planned while the loader says otherwise: a saved state would then skip or repeat them."""
    if getattr(loader, "_open_passes", 0):
        raise RuntimeError(
            f"{what}: a pass over this loader is running (an iterator not yet exhausted or "
            "closed); call it between passes: after the loop ends, or after the iterator's close()"
        )


def _called_from_keras(depth: int = 6, function: str | None = None) -> bool:
    """Is a ``keras`` module (its function ``function``, if given) among the callers of the
    calling method (a subclass may sit between)?"""
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith("keras.") and (
            function is None or frame.f_code.co_name == function
        ):
            return True
        frame = frame.f_back
    return False
