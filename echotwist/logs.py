"""
The text log: twistd's classic line format, written for a busy server.

twistd's own text observer (C{textFileLogObserver}) formats the timestamp of
every event from scratch (a time-zone lookup and an C{strftime}), runs every
message through the pure-Python formatter, and writes and flushes the file once
per line.  With one access-log line per request that was a quarter of a small
request's CPU.  L{TextLogObserver} writes the same lines
(C{"TIME [namespace#level] message"}) but formats the time once per second,
takes the access log's pre-formatted line as it is, and writes the lines of one
reactor turn with one write.

Under twistd the observer is handed over as the application's
L{ILogObserver} (L{TwistdLogObserver}), the hook twistd documents for choosing
an observer; it goes where twistd would have logged (stdout under C{-n}, else
C{--logfile} or C{twistd.log}, reopened on C{SIGUSR1} as twistd does), and
twistd keeps the choice for C{--syslog} and C{--logger}.
"""

from __future__ import annotations

import atexit
import signal
import sys
import threading
import time
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    eventAsText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python import logfile, threadable
from twisted.python.components import Componentized
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

#: The access log's event format: its line is formatted by the site, once.
ACCESS_FORMAT = "{line}"
#: Above this many bytes waiting, lines are written at once, not at the end
#: of the reactor turn.
MAX_PENDING = 64 * 1024


def emit(logger: Logger, level: LogLevel, format: str, **fields: Any) -> None:
    """
    Emit C{fields} as an event at C{level} through C{logger}: the event
    L{Logger.emit} makes, for a caller that knows its level is valid.

    L{Logger.emit} first checks the level against C{LogLevel.iterconstants()},
    which builds and sorts a list on every call: a few percent of a small
    request's CPU for the access log, whose level is a constant.
    """
    fields["log_logger"] = logger
    fields["log_level"] = level
    fields["log_namespace"] = logger.namespace
    fields["log_source"] = logger.source
    fields["log_format"] = format
    fields["log_time"] = time.time()
    logger.observer(fields)


@implementer(ILogObserver)
class TextLogObserver:
    """
    Writes events as twistd's text lines, C{"TIME [system] message"}.

    Lines logged from the reactor thread while the reactor runs are kept
    until the end of the reactor turn (a C{callLater(0)}) and written
    together: one write per turn instead of a write and a flush per line.
    Anything else (another thread, before or after the reactor runs, more
    than L{MAX_PENDING} bytes waiting) writes at once, after what is waiting,
    so lines stay in order; whatever is left is written at shutdown and at
    exit.

    @ivar prefix: put in front of every message (C{"[worker PID] "}).
    """

    def __init__(self, out: IO[str], prefix: str = "", reactor: Any = None) -> None:
        self._out = out
        self.prefix = prefix
        self._reactor = reactor
        self._lock = threading.RLock()
        self._pending: list[str] = []
        self._pending_size = 0
        self._flush_call: Any = None
        self._second = -1
        self._stamp = ""
        self._systems: dict[tuple[Any, Any], str] = {}
        # The line prefix of the last access event: its second, namespace,
        # level and the observer's own prefix then.
        self._access_second = -1
        self._access_namespace: Any = None
        self._access_level: Any = None
        self._access_own_prefix = prefix
        self._access_prefix = ""
        self._watching_shutdown = False

    # -- formatting -------------------------------------------------------------

    def _time(self, when: float | None) -> str:
        """The timestamp as twistd writes it; it has one-second resolution."""
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._stamp = formatTime(when, timeFormatRFC3339)
            self._second = second
        return self._stamp

    def _system(self, event: LogEvent) -> str:
        system = event.get("log_system")
        if system is not None:
            try:
                return str(system)
            except Exception:
                return "UNFORMATTABLE"
        key = (event.get("log_namespace", "-"), event.get("log_level"))
        text = self._systems.get(key)
        if text is None:
            level = key[1]
            text = f"{key[0]}#{level.name if level is not None else '-'}"
            self._systems[key] = text
        return text

    def format(self, event: LogEvent) -> str | None:
        """
        The event's line, exactly as twistd's text observer writes it
        (L{formatEventAsClassicLogText}), or L{None} for an event with no text.
        """
        if event.get("log_format") == ACCESS_FORMAT and "log_failure" not in event:
            text = str(event.get("line", ""))
        else:
            text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        if not text:
            return None
        prefix = f"{self._time(event.get('log_time'))} [{self._system(event)}] {self.prefix}"
        if event.get("log_format") == ACCESS_FORMAT and "log_system" not in event:
            # Kept for the access lines of the same second (see __call__).
            self._access_second = self._second
            self._access_namespace = event.get("log_namespace")
            self._access_level = event.get("log_level")
            self._access_own_prefix = self.prefix
            self._access_prefix = prefix
        return (prefix + text).replace("\n", "\n\t") + "\n"

    # -- writing ----------------------------------------------------------------

    def __call__(self, event: LogEvent) -> None:
        when = event.get("log_time")
        if (
            event.get("log_format") == ACCESS_FORMAT
            and when is not None
            and int(when) == self._access_second
            and event.get("log_namespace") == self._access_namespace
            and event.get("log_level") is self._access_level
            and self.prefix is self._access_own_prefix
            and "log_system" not in event
            and "log_failure" not in event
        ):
            # An access line in the same second as the last: what format()
            # returns, from the prefix it made then (one line per request).
            text = str(event.get("line", ""))
            line = self._access_prefix + text.replace("\n", "\n\t") + "\n" if text else None
        else:
            line = self.format(event)
        if line is not None:
            self.write_lines(line)

    def write_lines(self, text: str) -> None:
        """
        Write whole lines formatted elsewhere (a worker's own lines, see
        L{echotwist.workers}), in turn with this observer's own.
        """
        with self._lock:
            self._pending.append(text)
            self._pending_size += len(text)
            if self._pending_size <= MAX_PENDING and self._batching():
                if self._flush_call is None:
                    self._flush_call = self._reactor.callLater(0, self._end_of_turn)
                return
        self.flush()

    def _batching(self) -> bool:
        """Whether a line may wait for the end of the reactor turn."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        # isInIOThread(), without its two calls (threading.current_thread()):
        # this runs for every line.
        if not (self._reactor.running and threading.get_ident() == threadable.ioThread):
            return False
        if not self._watching_shutdown:
            # From here on lines may wait: write them at shutdown, and at exit
            # should the reactor never shut down cleanly.
            self._watching_shutdown = True
            self._reactor.addSystemEventTrigger("after", "shutdown", self.flush)
            atexit.register(self.flush)
        return True

    def _end_of_turn(self) -> None:
        self._flush_call = None
        self.flush()

    def flush(self) -> None:
        """Write every waiting line, now."""
        with self._lock:
            call, self._flush_call = self._flush_call, None
            if call is not None and call.active() and isInIOThread():
                # (From another thread it is left to run: it finds nothing to
                # write, and cancelling is not thread-safe.)
                call.cancel()
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            try:
                self._out.write(text)
                self._out.flush()
            except (OSError, ValueError):
                # The file is gone or closed (exit, a full disk): a log line
                # must never take the server down.
                pass


#: L{twistd_log_target}'s answer for stdout.
STDOUT = "-"


def twistd_log_target(options: Any) -> str | None:
    """
    Where the twistd running this plugin writes its text log, from its own
    options (C{options.parent}): L{STDOUT} (C{-n} without C{--logfile}, or
    with C{--logfile -}), or a file name (C{--logfile}, else C{twistd.log}).
    L{None} where twistd chooses something else or refuses: C{--syslog}, a
    C{--logger} of its own, C{--logfile -} in daemon mode, or no twistd.
    """
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return None
    try:
        if twistd["syslog"] or twistd["logger"]:
            return None
        name = twistd["logfile"]
        nodaemon = twistd["nodaemon"]
    except KeyError:
        return None
    if name == STDOUT:
        return STDOUT if nodaemon else None
    if nodaemon and not name:
        return STDOUT
    return str(name or "twistd.log")


def open_log_file(name: str) -> logfile.LogFile:
    """
    The log file as twistd opens it: a L{logfile.LogFile}, rotated on
    C{SIGUSR1} unless something else already handles that signal.
    """
    log_file = logfile.LogFile.fromFullPath(name)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


class TwistdLogObserver:
    """
    Mixed into the service twistd runs: when twistd makes it the
    application's service, it hands twistd the L{TextLogObserver} to log
    through (the application's L{ILogObserver} component, which twistd
    prefers to its own text observer).

    @ivar log_observer: set by C{makeService}; L{None} leaves twistd's own.
    """

    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)  # type: ignore[misc]
        observer = self.log_observer
        if (
            observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver) is None
        ):
            parent.setComponent(ILogObserver, observer)


def observer_for_twistd(options: Any) -> ILogObserver | None:
    """
    A L{TextLogObserver} on the file twistd would log to, or L{None} to leave
    the choice to twistd (see L{twistd_log_target}).
    """
    target = twistd_log_target(options)
    if target is None:
        return None
    out: Any = sys.stdout if target == STDOUT else open_log_file(target)
    return TextLogObserver(out)
