"""
Ctrl-C and SIGTERM during C{echotwist-client load}: a partial result, not a success.

Left to Twisted, SIGINT or SIGTERM stops the reactor, C{react} ends the
process with status 0, and no summary is printed: a CI job that is cut short
would report that every request verified.  While a load run goes on, an
L{Interruption} owns both signals instead: the first one tells the run to stop
(it abandons what is in flight and prints what it has), and the run ends with
the shell's status for that signal, 128 + its number (130 for SIGINT, 143 for
SIGTERM).  Later signals are absorbed, so that a terminal's Ctrl-C, which
reaches every process of the group, and the parent's forwarded one do not stop
a child before it has reported.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

#: The signals a load run answers with a partial summary.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interruption:
    """
    While installed, the first SIGINT or SIGTERM calls C{on_signal(signum)} on
    the reactor thread; L{signum} remembers which one came.
    """

    def __init__(self, reactor: Any, on_signal: Callable[[int], object]) -> None:
        self._reactor = reactor
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}
        self._wanted = False
        self.signum: int | None = None

    @property
    def exit_code(self) -> int | None:
        """The shell's status for the signal that came (128 + its number), else L{None}."""
        return None if self.signum is None else 128 + self.signum

    @property
    def name(self) -> str:
        return "" if self.signum is None else signal.Signals(self.signum).name

    def install(self) -> None:
        """
        Take over SIGINT and SIGTERM until L{uninstall}.  C{react} runs the
        command before the reactor starts, and the reactor sets its own SIGTERM
        handler as it starts: then this takes over once the reactor is running.
        """
        self._wanted = True
        if self._reactor.running:
            self._install()
        else:
            self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        # signal.signal works only on the main thread; elsewhere (a run inside
        # a thread) the reactor's own handling stays in place.
        if not self._wanted or threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        self._wanted = False
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        # A signal handler may run between any two bytecodes: hand the work to
        # the reactor, which this also wakes.
        self._reactor.callFromThread(self._on_signal, signum)
