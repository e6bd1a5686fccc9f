"""Signals deferred while the job talks to Dask: acted on at check(), at once when sent twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from service import interrupts


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
    with pytest.raises(Stop):
        with interrupts.deferred():
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


def test_a_default_sigterm_still_stops_the_process_after_the_block():
    """With no handler of Python's (SIG_DFL), the deferred SIGTERM does what it would have done."""
    code = (
        "import os, signal; from service import interrupts\n"
        "with interrupts.deferred():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('still running', flush=True)\n"
        "print('not reached', flush=True)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert result.returncode == -signal.SIGTERM
    assert result.stdout == "still running\n"
