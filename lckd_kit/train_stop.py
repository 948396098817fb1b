"""How a training run stops early: the exceptions :func:`lckd_kit.train.train` raises when the loss
diverges or the run is interrupted, and the SIGINT / SIGTERM handling that lets an interruption
wait for the next step boundary, where the state is consistent and can be saved.

:mod:`lckd_kit.train` re-exports the two exceptions.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

__all__ = ["TrainingDiverged", "TrainingInterrupted", "StopRequest", "StopNow"]


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the weights were not updated with it (the message says where
    the last finite state was saved)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on request (Ctrl-C, SIGTERM, a notebook's stop button) after saving
    ``path`` (None when nothing could be saved) at ``step``. A KeyboardInterrupt, so notebooks and
    scripts stop as they always did."""

    def __init__(self, message: str, step: int | None = None, path: Path | None = None, signum: int | None = None):
        super().__init__(message)
        self.step, self.path, self.signum = step, path, signum


class StopRequest:
    """SIGINT / SIGTERM while training: the first asks the loop to stop at the next step boundary
    (where the state is consistent and can be saved), a second stops at once. Handlers can only be
    installed in the main thread; elsewhere (a training thread) KeyboardInterrupt works as before."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise StopNow(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    previous = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    continue
                self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class StopNow(KeyboardInterrupt):
    """A second interrupt: stop without saving (the last regular checkpoint stays)."""
