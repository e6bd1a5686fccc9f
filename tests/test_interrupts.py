"""Ctrl-C and SIGTERM deferred while the main thread waits on other threads (store.interrupts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from store import interrupts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def ctrl_c_as_a_terminal_has_it():
    """Python's Ctrl-C handler, as in a terminal or a kernel: a job started in the background
    by a shell (CI) inherits SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class Stop(BaseException):
    pass


@pytest.fixture
def raising_sigterm():
    """SIGTERM handled as the CLI does: an exception in the main thread."""

    def handler(signum, frame):
        raise Stop(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_waits_for_check_and_then_acts_as_the_handler_before(raising_sigterm):
    with interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is not raising_sigterm
        with pytest.raises(Stop) as stopped:
            interrupts.check()
        assert stopped.value.args == (signal.SIGTERM,)
        interrupts.check()  # acted on once: nothing more pending
    assert signal.getsignal(signal.SIGTERM) is raising_sigterm


def test_a_signal_never_checked_acts_when_the_block_ends(raising_sigterm):
    reached_end_of_block = False
    with pytest.raises(Stop), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        reached_end_of_block = True
    assert reached_end_of_block
    assert signal.getsignal(signal.SIGTERM) is raising_sigterm


def test_the_same_signal_twice_acts_at_once(raising_sigterm):
    with interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Stop):
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs as soon as kill returns
        interrupts.check()  # the first was consumed by the second


def test_ctrl_c_is_deferred_and_raises_keyboard_interrupt_at_check():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_a_block_check_does_nothing():
    interrupts.check()


def test_in_another_thread_the_block_is_plain():
    seen = []

    def body():
        with interrupts.deferred():
            seen.append(signal.getsignal(signal.SIGTERM))
            interrupts.check()

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before]


def test_the_default_action_and_an_ignored_signal_are_left_alone():
    """No Python code runs for them in the main thread, so nothing can be left locked: SIGTERM
    with its default action stops the process at once, an ignored SIGINT stays ignored (and so
    inherited by processes started in the block)."""
    code = (
        "import os, signal; from store import interrupts\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "with interrupts.deferred():\n"
        "    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('ignored', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('not reached', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert result.stdout == "ignored\n"


def test_torch_workers_keep_the_sigterm_handler_torch_set_from_c():
    """torch's C handler ends a worker quietly (exit 0) on its parent's SIGTERM; the read-ahead's
    waits must not replace it with the default action (death by SIGTERM)."""
    pytest.importorskip("torch")
    code = (
        "import sys, time\n"
        "from concurrent.futures import Future\n"
        "from torch.utils.data._utils.signal_handling import _set_worker_signal_handlers\n"
        "from store import interrupts\n"
        "_set_worker_signal_handlers()\n"
        "done = Future(); done.set_result(1)\n"
        "interrupts.result_of(done)  # what a worker's read-ahead does per batch\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)  # from its parent, as the DataLoader stops its workers
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_an_inner_block_leaves_the_signal_to_the_outer_blocks_check(raising_sigterm):
    with interrupts.deferred():
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(Stop):
                interrupts.check()
        interrupts.check()


def test_a_signal_after_its_block_ended_acts_at_once(raising_sigterm):
    """A signal landing between the restores at a block's end reaches its handler then."""
    with interrupts.deferred():
        recorder = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stop):
        recorder(signal.SIGTERM, None)


def test_a_wait_on_another_thread_takes_ctrl_c_between_waits_and_the_thread_finishes():
    """The main thread waiting on a read-ahead future: Ctrl-C raises there, never inside the
    future's lock, so the thread that completes it is not blocked (the pool shuts down)."""
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(gate.wait, 30)
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            interrupts.result_of(future)
        gate.set()
        assert future.result(timeout=10) is True
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _CtrlCInEnter(threading.Condition):
    """A future's condition where Ctrl-C lands the moment its lock is taken in the main thread,
    before the ``with`` block that would release it: the window CPython leaves open."""

    fired = False

    def __enter__(self):
        taken = super().__enter__()
        if not self.fired and threading.current_thread() is threading.main_thread():
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)
        return taken


@pytest.mark.parametrize("wait", ["result_of", "plain"])
def test_ctrl_c_as_a_wait_takes_the_futures_lock_leaves_it_free(wait):
    """The thread that completes the future must still take its lock: a plain wait leaks it
    (that thread, and the process's exit, then hang); result_of does not."""
    gate = threading.Event()
    pool = ThreadPoolExecutor(1)
    future = pool.submit(gate.wait, 30)
    future._condition = _CtrlCInEnter()
    with pytest.raises(KeyboardInterrupt):
        interrupts.result_of(future) if wait == "result_of" else future.result()
    gate.set()
    completed = threading.Event()
    threading.Thread(target=lambda: (future.exception(), completed.set()), daemon=True).start()
    assert completed.wait(5) == (wait == "result_of")
    if wait == "plain":
        future._condition.release()  # the leaked lock (the main thread's): the pool's thread goes on
        assert completed.wait(5)
    pool.shutdown()


def test_a_future_that_itself_timed_out_raises_its_error():
    def late():
        raise TimeoutError("the server did not answer in 5 s")

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(late)
        with pytest.raises(TimeoutError, match="did not answer"):
            interrupts.result_of(future)


def test_results_in_order_and_the_rest_cancelled_when_one_fails():
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        assert interrupts.results_of([pool.submit(pow, 2, n) for n in range(4)]) == [1, 2, 4, 8]
        busy = pool.submit(gate.wait, 30)  # the pool's one thread, until the end
        never = pool.submit(pow, 2, 10)  # queued behind it
        failed: Future[int] = Future()
        failed.set_exception(ValueError("bad region"))
        with pytest.raises(ValueError, match="bad region"):
            interrupts.results_of([failed, never])
        gate.set()
        assert busy.result(timeout=10) is True
        assert never.cancelled()


def test_map_in_threads_gives_results_in_order_and_drops_the_rest_when_stopped():
    started: list[int] = []
    lock = threading.Lock()

    def slow_square(n: int) -> int:
        with lock:
            started.append(n)
        threading.Event().wait(0.01)
        if n == 5:
            raise ValueError("scan 5 is bad")
        return n * n

    assert list(interrupts.map_in_threads(slow_square, range(5), 2, "test")) == [0, 1, 4, 9, 16]
    started.clear()
    with pytest.raises(ValueError, match="scan 5 is bad"):
        list(interrupts.map_in_threads(slow_square, range(5, 400), 1, "test"))
    assert len(started) < 399  # those not started were dropped, not run
    started.clear()
    results = interrupts.map_in_threads(slow_square, range(400), 1, "test")
    assert next(results) == 0
    results.close()  # the caller stops early (a Ctrl-C in its loop does the same)
    assert len(started) < 400
    assert not [t for t in threading.enumerate() if t.name.startswith("test_")]


def test_map_in_threads_takes_ctrl_c_between_waits():
    gate = threading.Event()
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        for _ in interrupts.map_in_threads(lambda n: gate.wait(1), range(3), 1, "test"):
            pass
    gate.set()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_event_wait_takes_ctrl_c_between_waits():
    event = threading.Event()
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        interrupts.wait_event(event)
    threading.Timer(0.05, event.set).start()
    interrupts.wait_event(event)


def test_the_interrupt_behind_an_error_is_found_through_its_causes():
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop
    except ImportError as err:
        assert isinstance(interrupts.interrupt_behind(err), KeyboardInterrupt)
    try:
        try:
            raise OSError("disk full")
        except OSError:
            raise ValueError("bad scan")  # noqa: B904 (an implicit context)
    except ValueError as err:
        assert interrupts.interrupt_behind(err) is None


def test_ctrl_c_while_verify_loads_tensorstore_is_an_interruption_not_a_torn_scan(
    tmp_path, monkeypatch, capsys
):
    """A C extension stopped by Ctrl-C while it loads raises ImportError from it: verify used to
    report the scan TORN (and the next import aborted the process); it is an interruption."""
    from h5_sources import run_cli

    import service.verify as verify
    from service.cli import main
    from service.sample_data import write_sample_data

    source, store = tmp_path / "source", tmp_path / "store"
    write_sample_data(source, subjects=2, visits=1, shape=(16, 16, 4), num_classes=2, seed=1)
    assert run_cli("preprocess", source, store, "--workers", "1", "-q").returncode == 0

    def interrupted_import(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop

    monkeypatch.setattr(verify, "_read_array", interrupted_import)
    assert main(["verify", str(source), str(store)]) == 130
    out, err = capsys.readouterr()
    assert "TORN" not in out and err.strip().splitlines()[-1] == "scancache: interrupted", (out, err)


_SHARER_SCRIPT = """
import os, socket, sys, time
from multiprocessing import resource_sharer
from multiprocessing.reduction import DupFd
if sys.argv[1] == "quiet":
    from loaders.torch_data import _quiet_when_the_training_process_goes
    _quiet_when_the_training_process_goes()
r, w = os.pipe()
shared = DupFd(r)  # as a worker sends a batch's memory: the sharer's thread starts
# the training process, stopped by Ctrl-C mid-fetch, drops its connection
client = socket.socket(socket.AF_UNIX)
client.connect(resource_sharer._resource_sharer._address)
client.close()
time.sleep(1.0)
sys.excepthook(ValueError, ValueError("any other error"), None)
"""


@pytest.mark.parametrize("hook", ["quiet", "plain"])
def test_a_torch_worker_drops_the_traceback_of_a_fetch_cut_by_ctrl_c_and_no_other(hook):
    result = subprocess.run(
        [sys.executable, "-c", _SHARER_SCRIPT, hook], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ValueError: any other error", result.stderr
    cut = "resource_sharer.py" in result.stderr
    assert cut == (hook == "plain"), result.stderr  # without the hook, the sharer's traceback shows
