"""Graceful stops: SIGINT (Ctrl-C) and SIGTERM become a flag that the training loop reads
between steps, so a run can finish its step, write a checkpoint and exit cleanly.

A second signal aborts at once (``KeyboardInterrupt``); checkpoints are written atomically, so
even then ``checkpoint.pt`` is the last complete one.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

__all__ = ["StopSignals", "signal_name"]

SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


def signal_name(signum: int) -> str:
    """``"SIGINT"``, ``"SIGTERM"``, ... for a signal number."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signum` instead of killing.

    Outside the main thread (where Python cannot install handlers) it does nothing.

    :param log: called once with a short notice when the first signal arrives.
    """

    def __init__(self, log: Optional[Callable[[str], None]] = None):
        self.log = log
        self.signum: Optional[int] = None  # the first signal received, or None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop waiting for the step
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        if self.log is not None:
            self.log(f"{signal_name(signum)} received: stopping after this step (send it again to abort now)")
