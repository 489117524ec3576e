"""SIGTERM as an exception, where a process has something to undo before it ends."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(Exception):
    """SIGTERM arrived inside ``sigterm_unwinds``."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` for the block, so that every ``finally`` runs (stops the processes it
    started, removes a half-built folder), as it does for SIGINT; by default SIGTERM ends Python at once.
    Not for the Trainer's fit, which defers SIGTERM to a step boundary itself. Outside the main thread
    (where Python cannot install handlers) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
