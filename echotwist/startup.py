"""
What the terminal sees at start-up: the token and the CA once the server
listens, or one line saying why it cannot.

twistd binds in C{privilegedStartService}, after C{makeService} and, in daemon
mode, after it has detached (its standard streams are then C{/dev/null} and
the log).  A token printed from C{makeService} would reach the terminal even
when the bind then fails, so the server would look as if it had started.  So
L{Terminal.capture} keeps the terminal's stdout and stderr (duplicated file
descriptors, not sockets) when C{makeService} runs, and the service writes to
them only once the bind has succeeded or failed; the duplicates are closed at
once, so a detached daemon holds no terminal.  The original twistd process is
still waiting for its child's start-up then, so the lines arrive before the
C{twistd} command returns, as before.

When the bind fails in daemon mode, twistd tells that waiting process first
and removes the pidfile after, so the C{twistd} command could return while
the pidfile was still there (and a second start at once found "another
twistd server running").  L{Terminal.failed} removes the pidfile itself
before the failure goes back to twistd, and clears twistd's C{pidfile}
option so twistd does not try again (its own attempt would log a traceback
for a file already gone).
"""

from __future__ import annotations

import errno
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from twisted.logger import Logger

log = Logger()

#: Why a bind fails, for the errors a user can cause and fix.
_HINTS = {
    errno.EADDRINUSE: "address already in use (another server on that port?)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "no such address on this machine",
}


class CannotStart(SystemExit, Exception):  # noqa: N818 -- it is an exit
    """
    The server cannot start; the reason has been written to the terminal.

    An C{Exception}, so twistd's own start-up failure path runs (it removes the
    pidfile and, in daemon mode, tells the waiting parent to exit 1); a
    C{SystemExit}, so when it leaves twistd the interpreter exits with status 1
    without printing a traceback of a failure already explained in one line.
    """

    def __init__(self, line: str) -> None:
        super().__init__(1)
        self.line = line

    def __str__(self) -> str:
        # What a daemon's waiting parent shows after the line itself, within
        # the 100 bytes twistd passes it.
        return "cannot start: see the line above"


def listen_failure(interface: str, port: int, reason: BaseException, what: str = "") -> str:
    """
    The one line that says why the server cannot listen on C{interface}:C{port}
    (C{what}: which listener, when it is not the echo port).
    """
    while getattr(reason, "socketError", None) is not None:  # CannotListenError wraps it
        reason = reason.socketError  # type: ignore[attr-defined]
    if isinstance(reason, OSError):
        why = _HINTS.get(reason.errno or 0) or (reason.strerror or str(reason)).lower()
    else:
        why = str(reason)
    where = f"[{interface}]" if ":" in interface else interface
    return f"echo: cannot listen{' for ' + what if what else ''} on {where}:{port}: {why}"


class Terminal:
    """The stdout and stderr twistd had when it built the service."""

    def __init__(
        self,
        stdout: int,
        stderr: int,
        log_elsewhere: bool = True,
        twistd: MutableMapping[str, Any] | None = None,
    ) -> None:
        self._stdout: int | None = stdout
        self._stderr: int | None = stderr
        self._log_elsewhere = log_elsewhere
        self._twistd = twistd

    @classmethod
    def capture(
        cls, log_elsewhere: bool = True, twistd: MutableMapping[str, Any] | None = None
    ) -> Terminal:
        """
        Keep the current standard streams for the start-up report.

        @param log_elsewhere: whether the log goes somewhere other than this
            terminal (a file), so a failure is logged there too.
        @param twistd: the options of the twistd running the plugin (the
            plugin options' C{parent}), whose pidfile a failure removes.
        """
        return cls(os.dup(1), os.dup(2), log_elsewhere, twistd)

    def started(self, token: str, cafile: Path | None) -> None:
        """The server listens: give the user the token and the CA to trust."""
        text = f"Authentication token: {token}\n"
        if cafile is not None:
            text += f"Trust this CA in clients: {cafile}\n"
        self._write(self._stdout, text)
        self.close()

    def failed(self, line: str) -> CannotStart:
        """The server cannot start: say why in one line; return what to raise."""
        if self._log_elsewhere:
            log.error("{line}", line=line)
        self._release_pidfile()
        self._write(self._stderr, line + "\n")
        self.close()
        return CannotStart(line)

    def _release_pidfile(self) -> None:
        """
        Remove twistd's pidfile now, if it names this process, so it is gone
        before twistd lets the C{twistd} command return (see the module's
        docstring); a pidfile that names another process is left alone.
        """
        if self._twistd is None:
            return
        name = self._twistd.get("pidfile")
        if not name:
            return
        try:
            if int(Path(name).read_text().strip()) != os.getpid():
                return
            os.unlink(name)
        except (OSError, ValueError):
            return  # twistd's own removal will say why
        self._twistd["pidfile"] = ""

    def _write(self, fd: int | None, text: str) -> None:
        if fd is None:
            return
        data = text.encode("utf-8", "replace")
        while data:
            data = data[os.write(fd, data) :]

    def close(self) -> None:
        """Let go of the terminal (idempotent)."""
        for fd in (self._stdout, self._stderr):
            if fd is not None:
                os.close(fd)
        self._stdout = self._stderr = None
