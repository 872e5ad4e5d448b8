"""producer.interrupt: a Ctrl-C that Python drops (raised inside a finalizer) still stops a submit."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from producer import interrupt
from tests.helpers import wait_until


class PressedDuringFinalizer:
    """Ctrl-C arrives while the garbage collector runs this object's __del__: Python raises KeyboardInterrupt
    inside the finalizer, prints "Exception ignored" and goes on."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the handler runs at one of these bytecodes
            time.sleep(0.001)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_python_alone_drops_a_ctrl_c_raised_in_a_finalizer() -> None:
    start = time.monotonic()
    PressedDuringFinalizer()
    assert time.monotonic() - start < 4, "the KeyboardInterrupt did not reach the finalizer"
    interrupt.check()  # nothing remembered outside remembering()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_dropped_in_a_finalizer_is_raised_again_by_check() -> None:
    with interrupt.remembering():
        PressedDuringFinalizer()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        interrupt.check()  # once per press
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_remembered_ctrl_c_dropped_in_a_finalizer_prints_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    reported: list[object] = []
    previous, sys.unraisablehook = sys.unraisablehook, reported.append
    try:
        with interrupt.remembering():
            PressedDuringFinalizer()
            with pytest.raises(KeyboardInterrupt):
                interrupt.check()
    finally:
        sys.unraisablehook = previous
    assert reported == []  # the hook of the caller's never saw it; check() raised it instead
    assert "Traceback" not in capsys.readouterr().err


def test_a_ctrl_c_still_raises_at_once() -> None:
    with interrupt.remembering():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    interrupt.check()  # the press ended with the block


def test_a_caller_s_own_handler_is_left_alone() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with interrupt.remembering():
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: seen, 5, "the caller's handler to run")
            interrupt.check()
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    handlers: list[object] = []

    def run() -> None:
        with interrupt.remembering():
            handlers.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert handlers == [signal.default_int_handler]
