"""Graceful stops: SIGINT (Ctrl-C) and SIGTERM become a flag that the training loop reads
between steps, so a run can finish its step, write a checkpoint and exit cleanly.

A second signal aborts at once (``KeyboardInterrupt``); checkpoints are written atomically, so
even then ``checkpoint.pt`` is the last complete one.

**Fault injection** (for tests): with ``PYRO_VAE_SIGNAL_AT="E:S[:R]"`` in the environment the
training loop sends SIGTERM to its own process when it reaches point ``S`` of epoch ``E``
(1-based, as the messages count them), so a test can stop a run at a chosen place instead of at a
wall-clock moment (:class:`SignalAt`). ``S`` is ``start`` (the epoch's start, before the loop asks
whether to stop), a step number ``s`` (during step ``s``, before the step reads the stop flag: the
step finishes, then the loop stops), ``s+`` (during step ``s``, after it read the flag: under
torchrun the flag travels with the next step's gradients) or ``end`` (the epoch's bookkeeping:
after validation, before the checkpoint). Optional tokens after it: a rank ``R`` (only that
``torchrun`` rank signals; default every rank), ``SIGINT`` (instead of SIGTERM) and ``parent``
(signal the parent process instead: under torchrun the launcher, which forwards the signal to
every rank, as when a user or a scheduler stops the job). Unset, nothing happens; the check is
one comparison per step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Optional, Union

from ..core.errors import ConfigError

__all__ = ["StopSignals", "signal_name", "SignalAt", "SIGNAL_AT_ENV"]

SIGNAL_AT_ENV = "PYRO_VAE_SIGNAL_AT"

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
            try:
                self.log(f"{signal_name(signum)} received: stopping after this step (send it again to abort now)")
            except (RuntimeError, OSError, ValueError):  # it interrupted a write to the same stream (reentrant
                pass  # call) or the stream is gone: the stop is recorded all the same, only the notice is lost


class SignalAt:
    """Fault injection: sends a signal at one point of the training loop (see the module
    docstring for ``PYRO_VAE_SIGNAL_AT``). :meth:`reached` is called by the loop at every point;
    it signals once, when epoch and point match (and the rank, if one is given)."""

    POINTS = ("start", "end")  # besides step numbers s and s+

    def __init__(self, spec: str, rank: int = 0):
        parts = spec.strip().split(":")
        try:
            self.epoch, self.point = int(parts[0]), parts[1]
        except (ValueError, IndexError):
            raise self._bad(spec) from None
        step = self.point[:-1] if self.point.endswith("+") else self.point
        if self.epoch < 1 or not (self.point in self.POINTS or (step.isdigit() and int(step) >= 1)):
            raise self._bad(spec)
        only, self.signum, self.parent = None, signal.SIGTERM, False
        for token in parts[2:]:
            if token.isdigit():
                only = int(token)
            elif token == "parent":
                self.parent = True
            elif isinstance(getattr(signal, token.upper(), None), signal.Signals):
                self.signum = getattr(signal, token.upper())
            else:
                raise self._bad(spec)
        self.armed = only is None or only == rank

    @staticmethod
    def _bad(spec: str) -> ConfigError:
        return ConfigError(f"{SIGNAL_AT_ENV}={spec!r}: expected EPOCH:POINT[:RANK][:SIGNAL][:parent] with POINT "
                           "start, a step number s, s+ or end (e.g. 2:5, 2:5+:1, 3:end:0:parent)")

    @classmethod
    def from_env(cls, rank: int = 0) -> Optional["SignalAt"]:
        spec = os.environ.get(SIGNAL_AT_ENV)
        return cls(spec, rank) if spec else None

    def reached(self, epoch: int, point: Union[int, str]) -> None:
        """The loop is at ``point`` (``"start"``, a 1-based step number, ``"s+"`` or ``"end"``) of
        the 0-based ``epoch``: send the signal if that is the point asked for."""
        if self.armed and epoch + 1 == self.epoch and str(point) == self.point:
            self.armed = False
            os.kill(os.getppid() if self.parent else os.getpid(), self.signum)
