"""Copies of a loader: ``copy.copy`` shares, ``copy.deepcopy`` and ``pickle`` rebuild.

A loader holds threads, locks and open sources, none of which can be copied or pickled. What
it is made of can: its class, its ``Config``, its dataset dicts (sources as paths or URLs) and
its settings (``DataLoader._recipe``), plus where it stands (seed, epoch, position). A deep copy
or an unpickled loader is rebuilt from those: a new loader with its own sources and read-ahead,
giving the same batches from the same place. A torch worker rebuilds its loader the same way
(``loaders.torch_data``).

``copy.copy`` stays a plain shallow copy (sharing sources and caches): the loader makes one
itself to try a restored state's epoch plan without touching its own (``load_state_dict``).
"""

from __future__ import annotations

from typing import Any


def recipe_of(loader: Any, use: str) -> tuple[type, Any, list[dict[str, Any]], dict[str, Any]]:
    """``(class, config, dataset dicts, settings)`` that rebuild ``loader``; a dataset dict
    whose source is an object (not a path or URL) is refused in one line naming the scan."""
    dicts, settings = loader._recipe
    for d in dicts:
        if not isinstance(d["source"], str):
            raise TypeError(
                f"{use}: scan {d['scan_id']!r} has a source object, not a path or URL; "
                "a loader is rebuilt from its sources' paths or URLs"
            )
    # a subclass's own keyword arguments (build_loader(..., flip=True)) too
    kwargs = getattr(loader, "_init_kwargs", {})
    return type(loader), loader.cfg.copy(), [dict(d) for d in dicts], {**kwargs, **settings}


def rebuilt(
    cls: type,
    cfg: Any,
    dicts: list[dict[str, Any]],
    settings: dict[str, Any],
    where: tuple[int, int, int, int],
) -> Any:
    """A new loader from its recipe, at ``where``: (seed, epoch, position, position's workers)."""
    loader = cls(cfg, dicts, **settings)
    seed, epoch, position, workers = where
    loader.seed = seed
    loader._use_plan(loader._make_plan(epoch), position, workers)
    return loader


class Copies:
    """``DataLoader``'s copy and pickle support (module docstring)."""

    _recipe: tuple[list[dict[str, Any]], dict[str, Any]]
    _init_kwargs: dict[str, Any]

    def __copy__(self) -> Any:
        shallow = object.__new__(type(self))
        shallow.__dict__.update(self.__dict__)
        return shallow

    def __reduce__(self) -> tuple[Any, ...]:
        where = (int(self.seed), int(self.epoch), int(self._position), int(self._position_workers))  # type: ignore[attr-defined]
        return rebuilt, (*recipe_of(self, "copy.deepcopy or pickle of a loader"), where)
