"""Time limits for a block of Python code, on the main thread or any other.

Used for PyXtal attempts (which can loop for minutes) and oracle single points.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from contextlib import contextmanager


@contextmanager
def time_limit(seconds: float | None, error: type[BaseException] = TimeoutError):
    """Raise ``error`` in the calling thread when the block runs longer than ``seconds``.

    On the main thread with no interval timer armed, SIGALRM (which also interrupts
    blocking calls); elsewhere a timer thread that raises the exception in this thread
    asynchronously (CPython's PyThreadState_SetAsyncExc), delivered at the next
    Python bytecode. Neither interrupts one long C call.
    """
    if seconds is None or seconds <= 0:
        yield
        return
    on_main = threading.current_thread() is threading.main_thread()
    if (
        on_main
        and hasattr(signal, "setitimer")
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    ):
        with _alarm_limit(seconds, error):
            yield
    else:
        with _async_limit(seconds, error):
            yield


@contextmanager
def _alarm_limit(seconds: float, error: type[BaseException]):
    state = {"active": True}

    def on_alarm(signum, frame):
        if state["active"]:  # an alarm landing after the block ended is ignored
            raise error(f"ran past the {seconds:g} s time limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        state["active"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _async_limit(seconds: float, error: type[BaseException]):
    thread_id = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"active": True, "fired": False}

    def fire():
        with lock:
            if state["active"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    thread_id, ctypes.py_object(error)
                )

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            state["active"] = False
            if state["fired"]:  # clear an exception set but not yet delivered
                ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, None)
