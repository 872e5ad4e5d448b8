"""A Ctrl-C that a submit cannot lose.

Python turns SIGINT into KeyboardInterrupt at the next bytecode it runs, whatever that bytecode is. When it
belongs to a finalizer (a __del__ or weakref callback the garbage collector runs in the middle of a
150,000-row COPY, say) the exception is printed as "Exception ignored in ..." and dropped, and the submit goes
on to commit the job the user meant to stop (tests/test_interrupt.py shows the drop). Twice in our full test suite
a Ctrl-C'd submit ended with exit 0; its stderr was not kept, so that this was the cause is likely, not proven.

So while `remembering()` is active a Ctrl-C still raises KeyboardInterrupt at once, as before, and is also
remembered: `check()`, called between chunks and right before each commit, raises it again if it was pressed
and nobody stopped for it. The handler is installed only where Python's own default handler is (the main
thread, no handler of the caller's), and the previous one is restored on the way out.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_pressed = threading.Event()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed while remembering() is active (once per press)."""
    if _pressed.is_set():
        _pressed.clear()
        raise KeyboardInterrupt


def _remember(signum: int, frame: FrameType | None) -> None:
    _pressed.set()
    signal.default_int_handler(signum, frame)


@contextmanager
def remembering() -> Iterator[None]:
    """Within: Ctrl-C raises KeyboardInterrupt as usual and is remembered for check()."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pressed.clear()
    signal.signal(signal.SIGINT, _remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _pressed.clear()
