"""``loader.as_tf_dataset()``: the loader's batches as a ``tf.data.Dataset``.

It walks the loader's epoch (its order, sharding and state) through its one read-ahead layer
(``DataLoader.batches_of``), so it gives exactly ``loader[0], loader[1], ...``:
``Dataset.from_generator`` with a static ``element_spec`` (the batch size is static when every
batch is full), prefetched. One full pass is one epoch: at its end the loader moves to the
next epoch, so ``model.fit(ds, epochs=n)`` sees n different orders. Under a
``tf.distribute`` strategy each global batch is split between the replicas.

The loader's position (``state_dict``) counts the batches the consumer has taken, not those
tf.data has read ahead into its prefetch buffer: a step after the prefetch counts each batch as
it leaves, and ends the epoch when the last one has. So a loop stopped after k batches resumes
at batch k, and ``ds.take(1)`` moves the epoch on by one batch only.

A dataset made at the start of an epoch has a known length, ``len(loader)`` batches per pass,
as Keras needs for exact losses: a pass that begins where a ``take(k)`` stopped goes on into
the next epoch for its last k batches. A dataset made mid-epoch (after ``load_state_dict``) has
an unknown length: its first pass is the rest of that epoch, then whole epochs.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from loaders.backend import import_tensorflow
from loaders.input_shapes import examples_differ, shape_probes, varying_shape

if TYPE_CHECKING:
    from loaders.base import DataLoader


def _probes(loader: DataLoader) -> list[tuple[np.ndarray, ...]]:
    """One-example batches: enough for the shapes and dtypes of the spec (a few where scans
    differ in shape, ``loaders.input_shapes``). Test batches too are (x, y) here: Keras would
    take a third element (x_raw) for sample weights."""
    probes = shape_probes(loader)
    if len(probes) > 1 and examples_differ(probes):  # whole slices of scans that differ in shape
        return list(probes)
    elements = loader.batch_elements(0)[:1]
    x, y = loader.load_batch(elements)
    return [loader.preprocess(x, y)]


def tf_dataset(loader: DataLoader) -> Any:
    tf = import_tensorflow()

    if len(loader) == 0:
        raise ValueError("as_tf_dataset: the loader has no batches")
    n = loader._num_elements()
    full = (not loader.is_test and loader.drop_last) or n % loader.batch_size == 0
    batch_dim = loader.batch_size if full else None
    probes = _probes(loader)
    spec = tuple(
        tf.TensorSpec(
            (batch_dim, *varying_shape([p[i] for p in probes])), tf.as_dtype(probes[0][i].dtype), name=name
        )
        for i, name in enumerate(("x", "y"))
    )

    # Made at a pass boundary, every pass is len(loader) batches and the dataset says so: Keras
    # (3.15) averages one empty step into fit's and evaluate's loss on a dataset of unknown length
    # (n/(n+1) of it). Made mid-epoch (a resumed run), its first pass is the rest of the epoch.
    per_pass = len(loader) if loader._position == 0 else None
    # TensorFlow's registry of Python functions keeps what from_generator and py_function are
    # given for the life of the process (tensorflow#35084): they hold the loader weakly, and the
    # dataset objects strongly (below), so a dropped dataset frees its loader, threads and arrays.
    owner = weakref.ref(loader)

    def alive() -> DataLoader:
        found = owner()
        if found is None:
            raise ReferenceError("the loader of this tf.data.Dataset was garbage-collected")
        return found

    def batches() -> Iterator[tuple[np.ndarray, ...]]:
        loader = alive()
        epoch, rest = loader.epoch, loader.remaining_batches()
        for _, batch in loader.batches_of(epoch, rest):
            yield batch[:2]
        if per_pass is not None and len(rest) < per_pass:
            # this pass began mid-epoch (after a take()): it goes on into the next epoch
            head = loader.worker_lanes(epoch + 1, 1)[0][: per_pass - len(rest)]
            for _, batch in loader.batches_of(epoch + 1, head):
                yield batch[:2]

    def taken() -> np.int64:
        """One batch has left the prefetch buffer: count it, and after the epoch's last, the next epoch."""
        loader = alive()
        loader._position += 1
        if loader._position >= len(loader):
            loader.set_epoch(loader.epoch + 1)
        return np.int64(loader._position)

    def counted(*batch: Any) -> tuple[Any, ...]:
        tick = tf.py_function(taken, [], Tout=tf.int64)
        with tf.control_dependencies([tick]):
            return tuple(tf.identity(t) for t in batch)

    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec).prefetch(2).map(counted)
    if per_pass is not None:
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(per_pass))
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False  # nothing read ahead of the count
    dataset = dataset.with_options(options)
    # every dataset made from this one keeps its input dataset object, so this holds the loader
    # for as long as the user's pipeline exists
    dataset._scancache_loader = loader
    return dataset
