"""A Ctrl-C that a submit cannot lose.

Python turns SIGINT into KeyboardInterrupt at the next bytecode it runs, whatever that bytecode is. When it
belongs to a finalizer (a __del__ or weakref callback the garbage collector runs in the middle of a
150,000-row COPY, say) the exception is printed as "Exception ignored in ..." and dropped, and the submit goes
on to commit the job the user meant to stop (tests/test_interrupt.py shows the drop). Twice in our full test suite
a Ctrl-C'd submit ended with exit 0; its stderr was not kept, so that this was the cause is likely, not proven.

So while `remembering()` is active a Ctrl-C still raises KeyboardInterrupt at once, as before, and is also
remembered: `check()`, called between chunks and right before each commit, raises it again if it was pressed
and nobody stopped for it. The handler is installed only where Python's own default handler is (the main
thread, no handler of the caller's), and the previous one is restored on the way out. Meanwhile a Ctrl-C
dropped in a finalizer is not printed as "Exception ignored ... Traceback" (sys.unraisablehook): check()
raises it where the submit can stop cleanly ("Aborted!"), so the user sees no traceback.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

_pressed = threading.Event()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed while remembering() is active (once per press)."""
    if _pressed.is_set():
        _pressed.clear()
        raise KeyboardInterrupt


def _remember(signum: int, frame: FrameType | None) -> None:
    _pressed.set()
    signal.default_int_handler(signum, frame)


def _quiet_if_remembered(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt) and _pressed.is_set():
            return  # remembered: check() raises it again
        previous(unraisable)

    return hook


@contextmanager
def remembering() -> Iterator[None]:
    """Within: Ctrl-C raises KeyboardInterrupt as usual and is remembered for check()."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pressed.clear()
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_if_remembered(previous_hook)
    signal.signal(signal.SIGINT, _remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
        _pressed.clear()
