"""Stop requests from the outside world: SIGTERM (kill, torchrun, Kubernetes) and SIGUSR1 (SLURM's warning
before preemption) ask training to save a checkpoint at the end of the current step and exit cleanly."""
from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger("detkit.train")

# by name: the training step's all-reduce carries one flag per name, in this order
STOP_SIGNAL_NAMES = ("SIGTERM", "SIGUSR1")
STOP_SIGNALS = tuple(getattr(signal, name) for name in STOP_SIGNAL_NAMES if hasattr(signal, name))


class StopRequest:
    """A context manager that turns SIGTERM and SIGUSR1 into a flag the training loop polls between steps.

    Handlers are installed only in the main thread (Python delivers signals there); elsewhere the context does
    nothing. SIGINT is left alone, so Ctrl-C still interrupts at once. The previous handlers come back on exit.

    Attributes:
        signal_name: "SIGTERM" or "SIGUSR1" once a signal arrived, else None.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        # only set the flag: logging here could re-enter a stream the interrupted code is writing to
        if self.signal_name is None:  # a second signal while stopping changes nothing
            self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        else:
            logger.debug("not in the main thread: SIGTERM/SIGUSR1 will not stop training cleanly")
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
