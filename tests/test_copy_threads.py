"""A batch's copies on the process's share of the cores (loaders/batch_memory.py CopyThreads)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from loaders.batch_memory import COPY_THREADS_MAX, CopyThreads
from store import reader_share


@pytest.fixture
def share():
    """Set this process's share of the cores for a test (as a torch worker's is set)."""

    def set_share(threads: int, readers: int = 1) -> None:
        reader_share.set_reader_share(threads, readers)

    yield set_share
    reader_share.set_reader_share(None, 1)


def test_every_copy_runs_once_and_the_caller_shares_the_work(share):
    share(2)
    batch = np.zeros((16, 64, 64), np.float32)
    examples = np.random.default_rng(0).normal(size=(16, 64, 64)).astype(np.float32)
    threads: list[int] = []
    lock = threading.Lock()

    def copy(i: int) -> None:
        np.copyto(batch[i], examples[i])
        with lock:
            threads.append(threading.get_ident())

    copier = CopyThreads()
    copier.run([lambda i=i: copy(i) for i in range(16)])
    np.testing.assert_array_equal(batch, examples)
    assert len(threads) == 16
    assert threading.get_ident() in threads and len(set(threads)) == 2
    copier.close()


def test_one_core_of_share_copies_in_the_calling_thread_only(share):
    share(1, readers=2)
    seen: list[int] = []
    CopyThreads().run([lambda: seen.append(threading.get_ident()) for _ in range(5)])
    assert seen == [threading.get_ident()] * 5
    assert CopyThreads.threads(100) == 1


def test_threads_are_bounded_by_the_share_the_cap_and_the_tasks(share):
    share(64)
    assert CopyThreads.threads(100) == COPY_THREADS_MAX
    assert CopyThreads.threads(3) == min(3, COPY_THREADS_MAX)
    share(2)
    assert CopyThreads.threads(100) == 2


def test_an_error_in_a_copy_is_raised_only_once_no_helper_writes_any_more(share):
    # the batch's arrays are handed out again later: run() must not return while a helper
    # still writes into them, also when a copy failed
    share(4)
    done: list[int] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        if i == 9:  # the last copy of its helper's part (parts are i % 4)
            raise ValueError("example 9")
        with lock:
            done.append(i)

    with pytest.raises(ValueError, match="example 9"):
        CopyThreads().run([lambda i=i: task(i) for i in range(12)])
    assert sorted(done) == [i for i in range(12) if i != 9]
