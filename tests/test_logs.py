"""
The text log observer: twistd's own lines, written once per reactor turn.
"""

from __future__ import annotations

import io
import signal
import sys
import threading
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import TestCase

from echotwist.logs import (
    ACCESS_FORMAT,
    MAX_PENDING,
    STDOUT,
    TextLogObserver,
    emit,
    observer_for_twistd,
    twistd_log_target,
)

NOW = 1_795_000_000.25


class CountingFile(io.StringIO):
    """A text file that counts its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def running_reactor() -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.running = True
    return reactor


def event(**fields: Any) -> dict[str, Any]:
    base = {
        "log_time": NOW,
        "log_namespace": "echotwist.test",
        "log_level": LogLevel.info,
        "log_format": "hello {who}",
        "who": "world",
    }
    base.update(fields)
    return base


class FormatTests(TestCase):
    """Every line is exactly what twistd's own text observer writes."""

    def assertLikeTwistd(self, e: dict[str, Any]) -> None:
        ours = TextLogObserver(io.StringIO()).format(dict(e))
        twistds = formatEventAsClassicLogText(dict(e))
        self.assertEqual(ours, twistds)

    def test_a_plain_event(self) -> None:
        self.assertLikeTwistd(event())

    def test_an_access_line(self) -> None:
        e = event(log_format=ACCESS_FORMAT, line="127.0.0.1:5 POST /echo 200 in=3 out=3 0.1ms")
        self.assertLikeTwistd(e)
        self.assertTrue(
            TextLogObserver(io.StringIO())
            .format(e)
            .endswith(  # type: ignore[union-attr]
                "[echotwist.test#info] 127.0.0.1:5 POST /echo 200 in=3 out=3 0.1ms\n"
            )
        )

    def test_a_system_a_missing_level_and_a_multi_line_message(self) -> None:
        self.assertLikeTwistd(event(log_system="TLS Port 8000"))
        self.assertLikeTwistd(event(log_level=None, who="two\nlines"))
        self.assertLikeTwistd(event(log_time=None))

    def test_a_failure_has_its_traceback(self) -> None:
        try:
            raise ZeroDivisionError("on purpose")
        except ZeroDivisionError:
            failure = Failure()
        e = event(log_failure=failure)
        self.assertLikeTwistd(e)
        self.assertIn("ZeroDivisionError", TextLogObserver(io.StringIO()).format(e) or "")

    def test_an_event_without_text_writes_nothing(self) -> None:
        self.assertIsNone(TextLogObserver(io.StringIO()).format({"log_time": NOW}))

    def test_the_time_is_right_across_second_boundaries(self) -> None:
        observer = TextLogObserver(io.StringIO())
        for when in (NOW, NOW + 0.5, NOW + 0.8, NOW + 1.0, NOW + 3600.2, NOW):
            line = observer.format(event(log_time=when)) or ""
            self.assertTrue(line.startswith(formatTime(when) + " "), (when, line))

    def test_a_prefix_marks_the_message(self) -> None:
        line = TextLogObserver(io.StringIO(), prefix="[worker 7] ").format(event()) or ""
        self.assertTrue(line.endswith("[echotwist.test#info] [worker 7] hello world\n"), line)


class AccessLineTests(TestCase):
    def test_access_lines_in_a_row_are_written_like_twistd(self) -> None:
        """
        Access lines of one second reuse the prefix of the last one (a short
        path in the observer): what is written is still twistd's line, as the
        second, the namespace and the system change.
        """

        def access(line: str, **fields: Any) -> dict[str, Any]:
            return event(log_format=ACCESS_FORMAT, line=line, **fields)

        events = [
            access("a 200"),
            access("b 200", log_time=NOW + 0.5),
            access("c 401", log_namespace="echotwist.other"),
            access("d 200"),
            access("e 200", log_time=NOW + 1.2),
            access("f 200", log_time=NOW + 1.3, log_system="TLS Port 8000"),
            access("g\nsecond line", log_time=NOW + 1.4),
            access("", log_time=NOW + 1.5),
            access("h 200", log_time=NOW + 1.6, log_level=LogLevel.warn),
            access("i 200", log_time=NOW + 1.7),
            event(log_time=NOW + 1.8),
            access("j 200", log_time=NOW + 1.9),
        ]
        out = io.StringIO()
        observer = TextLogObserver(out)
        for e in events:
            observer(dict(e))
        expected = "".join(formatEventAsClassicLogText(dict(e)) or "" for e in events)
        self.assertEqual(out.getvalue(), expected)

    def test_a_new_prefix_is_used_at_once(self) -> None:
        out = io.StringIO()
        observer = TextLogObserver(out)
        line = event(log_format=ACCESS_FORMAT, line="a 200")
        observer(dict(line))
        observer.prefix = "[worker 3] "
        observer(dict(line))
        self.assertTrue(out.getvalue().endswith("[echotwist.test#info] [worker 3] a 200\n"))


class WriteTests(TestCase):
    """Lines of one reactor turn go out together; nothing waits otherwise."""

    def setUp(self) -> None:
        # The test runs in the thread the reactor would run in.
        saved = threadable.ioThread
        threadable.registerAsIOThread()
        self.addCleanup(setattr, threadable, "ioThread", saved)

    def test_lines_of_one_turn_are_one_write_at_its_end(self) -> None:
        out, reactor = CountingFile(), running_reactor()
        observer = TextLogObserver(out, reactor=reactor)
        for n in range(5):
            observer(event(who=str(n)))
        self.assertEqual(out.getvalue(), "")
        reactor.advance(0)
        self.assertEqual(out.writes, 1)
        self.assertEqual(
            [line.rsplit(" ", 1)[1] for line in out.getvalue().splitlines()],
            ["0", "1", "2", "3", "4"],
        )
        observer(event(who="next turn"))
        reactor.advance(0)
        self.assertEqual(out.writes, 2)

    def test_without_a_running_reactor_each_line_is_written_at_once(self) -> None:
        out = CountingFile()
        observer = TextLogObserver(out, reactor=MemoryReactorClock())
        observer(event())
        self.assertIn("hello world", out.getvalue())

    def test_a_line_after_the_reactor_stops_follows_the_waiting_ones(self) -> None:
        out, reactor = CountingFile(), running_reactor()
        observer = TextLogObserver(out, reactor=reactor)
        observer(event(who="before"))
        reactor.running = False
        observer(event(who="after"))
        self.assertEqual(
            [line.rsplit(" ", 1)[1] for line in out.getvalue().splitlines()], ["before", "after"]
        )

    def test_shutdown_writes_what_waits(self) -> None:
        out, reactor = CountingFile(), running_reactor()
        observer = TextLogObserver(out, reactor=reactor)
        observer(event(who="last words"))
        triggers = [t for t in reactor.triggers["after"]["shutdown"]]
        self.assertEqual(len(triggers), 1)
        function, args, kwargs = triggers[0]
        function(*args, **kwargs)
        self.assertIn("last words", out.getvalue())

    def test_a_full_buffer_is_written_at_once(self) -> None:
        out, reactor = CountingFile(), running_reactor()
        observer = TextLogObserver(out, reactor=reactor)
        big = "x" * 1000
        sent = 0
        while out.writes == 0:
            observer(event(who=big))
            sent += 1
            self.assertLess(sent * 1000, 2 * MAX_PENDING)
        self.assertEqual(out.getvalue().count(big), sent)

    def test_a_line_from_another_thread_is_written_at_once_after_the_waiting_ones(self) -> None:
        out, reactor = CountingFile(), running_reactor()
        observer = TextLogObserver(out, reactor=reactor)
        observer(event(who="reactor"))
        worker = threading.Thread(target=observer, args=(event(who="thread"),))
        worker.start()
        worker.join(10)
        self.assertEqual(
            [line.rsplit(" ", 1)[1] for line in out.getvalue().splitlines()],
            ["reactor", "thread"],
        )

    def test_a_closed_file_does_not_break_the_server(self) -> None:
        out = CountingFile()
        out.close()
        TextLogObserver(out, reactor=MemoryReactorClock())(event())


class EmitTests(TestCase):
    def test_the_event_is_the_one_logger_emit_makes(self) -> None:
        """
        L{emit} hands the observers the event L{Logger.emit} would have, the
        same keys and values (bar the time, which it stamps itself).
        """
        seen: list[dict[str, Any]] = []
        logger = Logger(namespace="echotwist.access", source=self, observer=seen.append)
        logger.info(ACCESS_FORMAT, line="the line", status=200)
        emit(logger, LogLevel.info, ACCESS_FORMAT, line="the line", status=200)
        ours, theirs = seen[1], seen[0]
        self.assertLessEqual(abs(ours.pop("log_time") - theirs.pop("log_time")), 1.0)
        self.assertEqual(ours, theirs)


class TwistdTargetTests(TestCase):
    """The observer goes where twistd would have written, or stays out of the way."""

    def target(self, *argv: str) -> str | None:
        config = ServerOptions()
        config.parseOptions([*argv, "echo", "--port", "0", "--cert-dir", self.mktemp()])
        return twistd_log_target(config.subOptions)

    def test_stdout_under_nodaemon(self) -> None:
        self.assertEqual(self.target("-n"), STDOUT)
        self.assertEqual(self.target("-n", "--logfile", "-"), STDOUT)

    def test_a_file_when_named_or_detached(self) -> None:
        self.assertEqual(self.target("-n", "--logfile", "x.log"), "x.log")
        self.assertEqual(self.target("--logfile", "x.log"), "x.log")
        self.assertEqual(self.target(), "twistd.log")

    def test_twistd_chooses_for_syslog_a_logger_and_a_daemon_on_stdout(self) -> None:
        self.assertIsNone(self.target("-n", "--syslog"))
        self.assertIsNone(self.target("--logger", "twisted.logger.textFileLogObserver"))
        self.assertIsNone(self.target("--logfile", "-"))

    def test_the_observer_writes_to_stdout_or_to_a_rotating_file(self) -> None:
        config = ServerOptions()
        config.parseOptions(["-n", "echo", "--port", "0", "--cert-dir", self.mktemp()])
        on_stdout = observer_for_twistd(config.subOptions)
        assert isinstance(on_stdout, TextLogObserver)
        self.assertIs(on_stdout._out, sys.stdout)

        saved = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, saved)
        name = self.mktemp()
        config = ServerOptions()
        config.parseOptions(
            ["-n", "--logfile", name, "echo", "--port", "0", "--cert-dir", self.mktemp()]
        )
        in_file = observer_for_twistd(config.subOptions)
        assert isinstance(in_file, TextLogObserver)
        self.assertIsInstance(in_file._out, LogFile)
        self.addCleanup(in_file._out.close)
