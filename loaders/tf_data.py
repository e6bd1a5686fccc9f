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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from loaders.backend import import_tensorflow

if TYPE_CHECKING:
    from loaders.base import DataLoader


def _probe(loader: DataLoader) -> tuple[np.ndarray, ...]:
    """One example's batch (a batch of one): enough for the shapes and dtypes of the spec."""
    elements = loader.batch_elements(0)[:1]
    x, y = loader.load_batch(elements)
    x_in, y_out = loader.preprocess(x, y)
    return (x_in, y_out, x) if loader.is_test else (x_in, y_out)


def tf_dataset(loader: DataLoader) -> Any:
    tf = import_tensorflow()

    if len(loader) == 0:
        raise ValueError("as_tf_dataset: the loader has no batches")
    n = loader._num_elements()
    full = (not loader.is_test and loader.drop_last) or n % loader.batch_size == 0
    batch_dim = loader.batch_size if full else None
    spec = tuple(
        tf.TensorSpec((batch_dim, *a.shape[1:]), tf.as_dtype(a.dtype), name=name)
        for a, name in zip(_probe(loader), ("x", "y", "x_raw"), strict=False)
    )

    def batches() -> Iterator[tuple[np.ndarray, ...]]:
        for _, batch in loader.batches_of(loader.epoch, loader.remaining_batches()):
            yield batch

    def taken() -> np.int64:
        """One batch has left the prefetch buffer: count it, and after the epoch's last, the next epoch."""
        loader._position += 1
        if loader._position >= len(loader):
            loader.set_epoch(loader.epoch + 1)
        return np.int64(loader._position)

    def counted(*batch: Any) -> tuple[Any, ...]:
        tick = tf.py_function(taken, [], Tout=tf.int64)
        with tf.control_dependencies([tick]):
            return tuple(tf.identity(t) for t in batch)

    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec).prefetch(2).map(counted)
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False  # nothing read ahead of the count
    return dataset.with_options(options)
