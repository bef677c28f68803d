"""
The TLS transport, server and load client: pyOpenSSL on memory BIOs, under
any protocol, moving bulk data in batches.

L{BulkTLSProtocol} is a protocol for the TCP transport and a transport for
the protocol it wraps, as Twisted's L{twisted.protocols.tls.TLSMemoryBIOProtocol}
is; it is written here, on pyOpenSSL's public API and Twisted's public
interfaces, rather than as a subclass that overrides Twisted's private
methods.  What it does differently, and why it exists:

  - the records that one read from the socket brought are decrypted into one
    buffer (C{SSL_read} straight into it, not pyOpenSSL's buffer and copy per
    record) and handed up in one C{dataReceived} call: Twisted hands each
    16 KiB record up on its own, so a 1 MiB request body climbs through the
    HTTP channel some 64 times;
  - every write is encrypted at once, with no gathering of small writes per
    connection (Twisted's C{BufferingTLSTransport} costs a C{callLater(0)}
    per response), since both our channels already write in batches (HTTP/1.1
    a small response as one buffer, HTTP/2 what one read's streams produced);
  - small ciphertext (a whole small response) waits for the end of the
    reactor turn and is sent then, one C{send} per connection, one timer per
    turn for all of them (L{EndOfTurnSender}): not queued in the TCP
    transport, which would cost two C{epoll_ctl} calls and a writable event
    per response;
  - a large write is fed to OpenSSL in L{WRITE_CHUNK} slices of a
    C{memoryview} (no copy), and each slice's ciphertext is read from the BIO
    into a buffer of ours and sent to the socket straight away when nothing is
    waiting before it (what the kernel does not take is queued as usual);
    Twisted cuts a write into 16 KiB slices (a copy each) and hands the TCP
    transport 64 pieces to join again;
  - the TCP transport reads up to L{READ_SIZE} bytes per C{recv} and sends up
    to L{SEND_LIMIT} per C{send} (64 KiB and 128 KiB in Twisted);
  - no class here has a C{__getattr__} (Twisted's L{ProtocolWrapper} has one),
    so CPython's specialised attribute loads work on every access.

The bulk path calls libssl through pyOpenSSL's cffi bindings, which are
private; they and the three pointers they take are named, with why, in
L{echotwist.upstream}.  The handshake, errors and the TLS shutdown go through
pyOpenSSL's public methods.

L{BulkTLSFactory} builds these protocols, and L{TLSServerEndpoint} listens
with it where C{SSL4ServerEndpoint} would have used Twisted's own factory.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any, cast

from OpenSSL import SSL
from OpenSSL.SSL import Error, SysCallError, WantReadError, ZeroReturnError
from twisted.internet import endpoints, interfaces
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import NotPaused, TaskFinished, TaskStopped, cooperate
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echotwist.metrics import COUNTS, handshake_failure_reason
from echotwist.upstream import ffi as _ffi
from echotwist.upstream import libssl as _lib
from echotwist.upstream import ssl_pointers, tcp_queue_length

#: Bytes the TCP transport asks the kernel for per read (Twisted's default is
#: 64 KiB): a 1 MiB body arrives in a few reactor turns instead of 16+.
READ_SIZE = 256 * 1024
#: Bytes the TCP transport hands the kernel per C{send} (Twisted's default is
#: 128 KiB, one C{send} per writable event).
SEND_LIMIT = 1024 * 1024
#: Ciphertext at least this large is sent inline when nothing is queued (see
#: L{BulkTLSProtocol._send}); smaller pieces wait for the end of the reactor turn.
LARGE_WRITE = 16 * 1024
#: Plaintext bytes per C{SSL_write}.  With partial writes off (L{echotwist.tls})
#: OpenSSL encrypts a whole slice, several records, per call; the slice bounds
#: the ciphertext a connection holds at once.
WRITE_CHUNK = 256 * 1024
#: What a record adds to its plaintext, at most, with the suites we offer
#: (header, explicit nonce or content type, tag), with room to spare.
RECORD_OVERHEAD = 64
#: The largest TLS record's plaintext.
MAX_RECORD = 16 * 1024
#: Seconds the peer has, once our close_notify is out, to answer with its own
#: or close TCP (Twisted's HTTP abortTimeout): then TCP is closed without it,
#: as soon as the peer has read what was sent (it is aborted if it reads nothing).
CLOSE_TIMEOUT = 15.0

_log = Logger(namespace="echotwist.transport")

#: cffi buffers that are not zeroed first: every byte read is written by OpenSSL.
_allocate = _ffi.new_allocator(should_clear_after_alloc=False)


def ciphertext_bound(plaintext: int) -> int:
    """
    At least the number of ciphertext bytes C{plaintext} bytes of application
    data become, plus room for a few handshake messages (session tickets)
    OpenSSL may have queued.
    """
    records = plaintext // MAX_RECORD + 1
    return plaintext + records * RECORD_OVERHEAD + 4096


def _read_plaintext(tls: Any, ssl: Any, into_ssl: Any) -> tuple[bytes, bool]:
    """
    Decrypt the records waiting in C{tls}'s receive BIO into one buffer, sized
    for all of them, and return its contents and whether the buffer filled up
    (more may be waiting).

    Calls C{SSL_read} directly (through pyOpenSSL's private cffi bindings):
    pyOpenSSL's C{recv} would allocate a buffer per record and copy it out.
    When nothing was read, the error C{SSL_read} reported is raised as
    pyOpenSSL raises it (C{WantReadError} when the BIO holds no whole record,
    C{ZeroReturnError} at the peer's close, C{Error} otherwise); when some
    plaintext was read before an error, the plaintext is returned and the
    error is met again on the next call.

    @param ssl: C{tls}'s C{SSL} pointer.
    @param into_ssl: C{tls}'s receive BIO.
    """
    # Ciphertext is never shorter than the plaintext it carries.
    room = max(_lib.BIO_get_mem_data(into_ssl, _ffi.NULL) + _lib.SSL_pending(ssl), MAX_RECORD)
    buffer = _allocate("char[]", room)
    filled = 0
    result = 0
    while filled < room:
        result = _lib.SSL_read(ssl, buffer + filled, room - filled)
        if result <= 0:
            break
        filled += result
        if not _lib.SSL_pending(ssl) and not _lib.BIO_get_mem_data(into_ssl, _ffi.NULL):
            # Every byte that came in is consumed: another SSL_read would
            # only say so (the usual end for a small request).
            return _ffi.buffer(buffer, filled)[:], False
    if filled:
        # More when the buffer filled, or when SSL_read stopped on something
        # other than "no whole record left" (the peer's close, an error): the
        # caller meets it on its next call.
        more = filled == room or _lib.SSL_get_error(ssl, result) != _lib.SSL_ERROR_WANT_READ
        return _ffi.buffer(buffer, filled)[:], more
    if _lib.SSL_get_error(ssl, result) == _lib.SSL_ERROR_WANT_READ:
        # No whole record (a record split over two reads): the usual failure.
        raise WantReadError()
    # Anything else (the peer's close_notify, an alert, a bad record):
    # pyOpenSSL's own recv meets the same state again, since nothing came in
    # since, and raises it as pyOpenSSL raises it, with the reason OpenSSL
    # left on its error queue.  Should it read something after all, that is
    # what there was.
    return tls.recv(MAX_RECORD), True


def _represents_eof(error: Error) -> bool:
    """
    Whether an OpenSSL error says the peer closed TCP without a TLS close:
    reported as a lost connection, as Twisted reports it.
    """
    if isinstance(error, SysCallError):
        return str(error.args[-1]).casefold().startswith("unexpected eof")
    queue = error.args[0] if error.args else None
    if not queue:
        return True
    return str(queue[-1][-1]).casefold().startswith("unexpected eof")


def _tls_log_prefix(wrapped: Any) -> str:
    """What Twisted's logs call a TLS connection or factory: the wrapped one's name, marked."""
    inner = (
        wrapped.logPrefix()
        if interfaces.ILoggingContext.providedBy(wrapped)
        else type(wrapped).__name__
    )
    return f"{inner} (TLS)"


def _forwarder(name: str) -> Any:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.transport, name)(*args, **kwargs)

    forward.__name__ = name
    forward.__doc__ = f"C{{{name}}} of the TCP transport underneath."
    return forward


@implementer(
    interfaces.ISSLTransport,
    interfaces.INegotiated,
    interfaces.ISystemHandle,
    interfaces.IPushProducer,
    interfaces.IConsumer,
    interfaces.ILoggingContext,
)
class BulkTLSProtocol(Protocol):
    """
    TLS over a TCP transport, for the protocol it wraps.

    The life of a connection: the handshake runs from the first bytes; the
    wrapped protocol is connected at once and what it writes before the
    handshake is done waits (L{_held}); then records are decrypted as they
    come and writes encrypted as they are made.  C{loseConnection} sends
    close_notify once held writes and a streaming producer are done, and
    closes TCP when the peer has answered with its own (or goes away, or
    L{CLOSE_TIMEOUT} passes); C{abortConnection} drops everything, sending
    nothing more.  The wrapped protocol's
    C{connectionLost} gets the TLS failure if there was one, else TCP's
    reason.

    @ivar wrappedProtocol: the protocol this connection carries.
    @ivar disconnecting: C{loseConnection} or C{abortConnection} was called.
    """

    factory: BulkTLSFactory
    #: The TCP transport (Twisted's C{tcp.Server} or C{tcp.Client}).
    transport: Any
    connected = False
    disconnecting = False
    #: The TLS connection (L{None} once the connection is gone).
    _tls: SSL.Connection | None = None
    handshake_done = False
    #: TLS is over: shut down, failed, or the TCP connection is gone.
    _tls_lost = False
    _aborted = False
    #: The reason the wrapped protocol's connectionLost gets, when TLS knows better than TCP.
    _lost_reason: Failure | None = None
    #: The producer the wrapped protocol registered (passed on to the TCP transport).
    _producer: Any = None
    #: Steps of the handshake taken so far; -1 once it is counted, or on a client.
    _handshake_steps = 0
    #: The bound on the wait for the peer's close_notify (L{CLOSE_TIMEOUT}).
    _close_call: IDelayedCall | None = None
    #: What the TCP transport still held to send when the close timer was set.
    _close_queued = 0

    def __init__(self, factory: BulkTLSFactory, wrapped: IProtocol) -> None:
        self.factory = factory
        self.wrappedProtocol = wrapped
        #: Plaintext written before the handshake finished, or refused by OpenSSL for now.
        self._held: list[bytes] = []
        #: Small ciphertext waiting for the end of the reactor turn.
        self._waiting: list[bytes] = []

    # -- the connection -------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        # Instance attributes of the TCP transport: tcp.Connection.doRead reads
        # bufferSize bytes, writeSomeData sends at most SEND_LIMIT.
        transport.bufferSize = READ_SIZE
        transport.SEND_LIMIT = SEND_LIMIT
        self._tls = tls = self.factory.connection_for(self)
        #: The connection's C{SSL} pointer and memory BIOs (cffi pointers).
        self._ssl_pointer, self._bio_in, self._bio_out = ssl_pointers(tls)
        Protocol.makeConnection(self, transport)
        self.wrappedProtocol.makeConnection(self)
        self._handshake()

    def logPrefix(self) -> str:
        return _tls_log_prefix(self.wrappedProtocol)

    def _handshake(self) -> None:
        """One step of the handshake (at connect, then per read until it is done), counted."""
        if self._aborted or self._tls is None:
            return
        try:
            self._tls.do_handshake()
        except WantReadError:
            self._flush_tls_output()
        except Error:
            self._tls_failed(Failure())
        else:
            self.handshake_done = True
            listener = self.wrappedProtocol
            if IHandshakeListener.providedBy(listener):
                listener.handshakeCompleted()
        if not self.factory.server_side or self._handshake_steps < 0:
            return
        self._handshake_steps += 1
        if self.handshake_done:
            COUNTS.handshake_done()
            self._handshake_steps = -1
        elif self._tls_lost and self._lost_reason is not None:
            COUNTS.handshake_failed(handshake_failure_reason(self._lost_reason))
            self._handshake_steps = -1

    def getHandle(self) -> SSL.Connection | None:
        """The pyOpenSSL connection (for C{Certificate.peerFromTransport} and the like)."""
        return self._tls

    def getPeerCertificate(self) -> Any:
        return self._tls.get_peer_certificate() if self._tls is not None else None

    @property
    def negotiatedProtocol(self) -> bytes | None:
        """The protocol ALPN agreed on (L{None} before the handshake, or without ALPN)."""
        if self._tls is None:
            return None
        return self._tls.get_alpn_proto_negotiated() or None

    getPeer = _forwarder("getPeer")
    getHost = _forwarder("getHost")
    getTcpNoDelay = _forwarder("getTcpNoDelay")
    setTcpNoDelay = _forwarder("setTcpNoDelay")
    getTcpKeepAlive = _forwarder("getTcpKeepAlive")
    setTcpKeepAlive = _forwarder("setTcpKeepAlive")
    #: Producer calls from the wrapped protocol (a channel that stops reading).
    pauseProducing = _forwarder("pauseProducing")
    resumeProducing = _forwarder("resumeProducing")
    stopProducing = _forwarder("stopProducing")

    # -- in -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Ciphertext from the socket.  Once the handshake is done and nothing is
        held, it goes into the BIO with C{BIO_write} directly (pyOpenSSL's
        C{bio_write} checks its argument's type and warns about text first);
        before, it drives the handshake.
        """
        if self.handshake_done and not self._held:
            if _lib.BIO_write(self._bio_in, _ffi.from_buffer(data), len(data)) <= 0:
                # It did not take the bytes (out of memory): pyOpenSSL's own
                # bio_write tries again and raises what OpenSSL says.
                self._tls.bio_write(data)  # type: ignore[union-attr]
            self._read_records()
            return
        if self._tls is None:
            return
        self._tls.bio_write(data)
        if not self.handshake_done:
            self._handshake()
            if not self.handshake_done:
                return
        if self._held:
            self._release_held()
        self._read_records()

    def _read_records(self) -> None:
        """
        Decrypt every record the receive BIO holds and deliver the plaintext in
        one C{dataReceived} call.

        The records are decrypted straight into one buffer sized for all of
        them (L{_read_plaintext}), which is copied out once: pyOpenSSL's
        C{recv} allocates a buffer per record and copies each out, and the
        records then had to be joined, a second copy of a large body.
        Bounded: the BIO holds at most what one read from the socket brought.
        """
        tls = self._tls
        ssl, into_ssl = self._ssl_pointer, self._bio_in
        chunks: list[bytes] = []
        while not self._tls_lost:
            try:
                chunk, more = _read_plaintext(tls, ssl, into_ssl)
            except WantReadError:
                break
            except ZeroReturnError:
                # The peer closed TLS: what it sent before that goes up first.
                self._deliver(chunks)
                chunks = []
                self._shutdown_tls()
                self._tls_over(None)
                continue
            except Error:
                failure = Failure()
                self._deliver(chunks)
                chunks = []
                self._tls_failed(failure)
                continue
            if chunk:
                chunks.append(chunk)
            if not more:
                break
        self._deliver(chunks)
        # The records read may have produced a reply (e.g. a KeyUpdate); when
        # they did not, small writes stay waiting for the end of the turn.
        if _lib.BIO_get_mem_data(self._bio_out, _ffi.NULL) > 0:
            self._flush_tls_output()

    def _deliver(self, chunks: list[bytes]) -> None:
        if not chunks or self._aborted:
            return
        self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    # -- out ----------------------------------------------------------------

    def write(self, data: Any) -> None:
        """
        Encrypt C{data} and send it (small ciphertext at the end of the turn).
        Before the handshake is done it is held; after C{loseConnection} it is
        dropped, unless a producer is still registered.
        """
        if self.disconnecting and self._producer is None:
            return
        if not self.handshake_done or self._held:
            self._hold(bytes(data))
            return
        self._encrypt(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def _hold(self, data: bytes) -> None:
        """Keep plaintext OpenSSL cannot take yet, and ask the producer to pause."""
        self._held.append(data)
        if self._producer is not None:
            self._producer.pauseProducing()

    def _release_held(self) -> None:
        """Encrypt what was held; then resume the producer, or finish a close that waited."""
        held, self._held = self._held, []
        for data in held:
            self._encrypt(data)
        if self._held:
            return
        if self._producer is not None:
            self._producer.resumeProducing()
        elif self.disconnecting:
            self._shutdown_tls()

    def _encrypt(self, data: Any) -> None:
        """
        Encrypt C{data} in L{WRITE_CHUNK} slices and hand each slice's
        ciphertext to the TCP transport in one piece.

        Calls C{SSL_write} directly, like L{_read_plaintext} calls C{SSL_read}:
        pyOpenSSL's C{send} would also look at its three callback helpers and
        the error state after every successful write, where only a failed one
        (C{SSL_write} returning 0 or less) has an error to raise.
        """
        if self._tls_lost or self._aborted:
            return
        ssl = self._ssl_pointer
        view = memoryview(data)
        total = len(view)
        done = 0
        while done < total:
            piece = view[done : done + WRITE_CHUNK]
            sent = _lib.SSL_write(ssl, _ffi.from_buffer(piece), len(piece))
            if sent <= 0:
                # pyOpenSSL's own send meets the same failure again (the
                # reason is still on OpenSSL's error queue) and raises it as
                # pyOpenSSL raises it.
                try:
                    sent = self._tls.send(piece)  # type: ignore[union-attr]
                except WantReadError:
                    self._hold(view[done:].tobytes())
                    break
                except Error:
                    self._tls_failed(Failure())
                    break
                if sent <= 0:
                    # A failure OpenSSL gives no reason for: never loop on it.
                    self._tls_failed(Failure(Error("SSL_write failed")))
                    break
            done += sent
            self._flush_send_bio(sent)

    def _flush_send_bio(self, plaintext: int) -> None:
        """
        Hand everything the send BIO holds to the TCP transport, in one write.

        The ciphertext is read into one buffer of ours and sent from it
        (L{_send}) without the copy into a new string that pyOpenSSL's
        C{bio_read} makes; only what has to wait in the transport's queue is
        copied.
        """
        size = ciphertext_bound(plaintext)
        from_ssl = self._bio_out
        while True:
            buffer = _allocate("char[]", size)
            filled = 0
            while filled < size:
                wanted = size - filled
                result = _lib.BIO_read(from_ssl, buffer + filled, wanted)
                if result <= 0:
                    break
                filled += result
                if result < wanted:
                    # A memory BIO gives all it holds: it is empty now (the
                    # usual end: no second BIO_read only to hear so).
                    break
            if filled:
                self._send(_ffi.buffer(buffer, filled))
            if filled < size:
                return
            # More than the bound (session tickets queued with a large
            # write): the rest follows in another write.

    def _send(self, data: Any) -> None:
        """
        Hand ciphertext to the TCP transport.

        Small pieces (a whole small response) wait for the end of the reactor
        turn (L{EndOfTurnSender}) and go out then, all of a connection's in
        one C{send}.  Twisted's transport would queue them, ask epoll to watch
        the socket for writability (an C{epoll_ctl}), send on the writable
        event in the next turn and stop watching (another C{epoll_ctl}): two
        system calls and a trip through the reactor's event dispatch per
        response.  Sending each at once instead woke the client in the middle
        of the turn, and a keep-alive 64 B request cost ~10% more server CPU
        (A/B in bench/README.md); at the end of the turn, every response of
        the turn is out before any client answers.

        Large ciphertext is sent now if nothing is waiting before it, as
        asyncio's transports do; what the kernel does not take is queued.
        C{FileDescriptor.write} always queues and waits for the next writable
        event, where it joins everything queued into one string (a copy of the
        whole response) before the first C{send}.

        @param data: a buffer (C{bytes} or a cffi buffer of ours): what waits
            or is queued is copied into C{bytes} first.
        """
        if self._aborted:
            return
        if len(data) < LARGE_WRITE:
            if not self._waiting:
                self.factory.end_of_turn.add(self)
            self._waiting.append(bytes(data))
            return
        self.send_waiting()
        self._send_now(data)

    def _send_now(self, data: Any) -> None:
        """
        Send C{data} if the TCP transport has nothing queued; queue what the
        kernel does not take (L{tcp_queue_length} reads the transport's queue).
        """
        if self._aborted:
            return
        t: Any = self.transport
        if t.connected and not t.disconnecting and not tcp_queue_length(t):
            sent = t.writeSomeData(data)
            if isinstance(sent, int) and sent > 0:
                if sent == len(data):
                    return
                data = memoryview(data)[sent:]
        # Also where an error from writeSomeData ends up: the transport meets
        # it again on its next send and closes the connection as usual.
        t.write(bytes(data))

    def write_now(self, data: bytes) -> None:
        """
        Encrypt and send C{data} at once, with whatever waits before it: for
        a client whose request is the whole of what it has to say (the load
        client).  At the end of the turn the request would wait until every
        answer read in that turn had been handled, and the client would count
        that wait as the server's latency; the cost is the same either way
        (one record and one C{send} per request).
        """
        self.write(data)
        self.send_waiting()

    def send_waiting(self) -> None:
        """Send the small pieces waiting for the end of the turn, now."""
        waiting = self._waiting
        if not waiting:
            return
        self._waiting = []
        data = waiting[0] if len(waiting) == 1 else b"".join(waiting)
        t: Any = self.transport
        if t is not None and t.connected:
            self._send_now(data)

    def _flush_tls_output(self) -> None:
        """
        Send what OpenSSL itself wrote (the handshake, alerts, close_notify),
        with what waits for the end of the turn before it, in one C{send}.

        One send, not two: a response waiting for the end of the turn and
        the close_notify of a connection closed after it (HTTP/1.0,
        C{Connection: close}) would otherwise be two small segments, and
        Nagle's algorithm holds the second until the client's delayed ACK of
        the first, 40 ms later; the client sees the end of the answer that
        late.  (A new connection per request ran at a quarter of its rate.)
        """
        if self._tls is not None:
            try:
                data = self._tls.bio_read(2**15)
            except WantReadError:
                data = b""
            while data:
                self._waiting.append(data)
                try:
                    data = self._tls.bio_read(2**15)
                except WantReadError:
                    break
        self.send_waiting()

    # -- the end ------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        A streaming producer is passed on to the TCP transport, which pauses
        and resumes it as its buffer fills and drains.  A pull producer is
        asked for more by a cooperative task (L{_PullAsPush}) that the TCP
        transport pauses and resumes the same way: the TCP transport itself
        asks a pull producer for more only when a write of its own queue
        ends, and small writes here bypass that queue.
        """
        if self._tls_lost:
            producer.stopProducing()
            return
        if not streaming:
            producer = _PullAsPush(producer)
        self.transport.registerProducer(producer, True)
        self._producer = producer
        if isinstance(producer, _PullAsPush):
            producer.start()

    def unregisterProducer(self) -> None:
        if self._producer is None:
            return
        if isinstance(self._producer, _PullAsPush):
            self._producer.finish()
        self._producer = None
        self.transport.unregisterProducer()
        if self.disconnecting and not self._held:
            self._shutdown_tls()

    def loseConnection(self) -> None:
        """
        Send close_notify once what is held and the producer are done; TCP
        is closed when the peer answers with its own close_notify or goes,
        or at the latest L{CLOSE_TIMEOUT} after ours.
        During the handshake there is nothing to shut down: the connection
        is aborted (OpenSSL would wait for the handshake to end first).
        """
        if self.disconnecting or not self.connected:
            return
        if not self.handshake_done and not self._held:
            self.abortConnection()
        self.disconnecting = True
        if not self._held and self._producer is None:
            self._shutdown_tls()

    #: TLS's half-close is its close_notify, and C{loseConnection} already
    #: reads on until the peer answers with its own.
    loseWriteConnection = loseConnection

    def abortConnection(self) -> None:
        """
        Drop the connection: nothing more is delivered or sent, not even a
        close_notify, which would tell the peer it had everything.  (Twisted's
        TLS leaves its close_notify in the TCP transport's queue, which an
        abort discards; here small writes wait for the end of the turn and
        large ones go straight to the socket, so they are dropped here.)
        """
        self._aborted = True
        self.disconnecting = True
        self._waiting = []
        self.factory.end_of_turn.discard(self)
        self._shutdown_tls()
        self.transport.abortConnection()

    def failVerification(self, reason: Failure) -> None:
        """
        The peer's certificate failed our check (Twisted's client connection
        creators call this): abort, with C{reason} for connectionLost.
        """
        self._lost_reason = reason
        self.abortConnection()

    def _shutdown_tls(self) -> None:
        """Send our close_notify (or answer the peer's); close TCP when both are done."""
        if self._tls is None:
            return
        try:
            done = self._tls.shutdown()
        except Error:
            # Mid-handshake OpenSSL may refuse (pyOpenSSL cannot tell why).
            done = False
        self._flush_tls_output()
        if done:
            self.transport.loseConnection()
        elif (
            not self._aborted
            and self._close_call is None
            and self._tls.get_shutdown() & SSL.SENT_SHUTDOWN
        ):
            # Twisted's TLS waits for the peer's close_notify for ever: a
            # client that reads our answer and then neither answers nor
            # closes TCP would hold the connection (and its place under the
            # connection cap) until the process ends.
            self._close_queued = tcp_queue_length(self.transport)
            self._close_call = self.factory.reactor_clock.callLater(
                CLOSE_TIMEOUT, self._close_timed_out
            )

    def _close_timed_out(self) -> None:
        """
        The peer has not answered our close_notify in time: close TCP once it
        has read what was sent; wait on while it reads; abort if it stopped.
        """
        self._close_call = None
        if not self.connected:
            return
        queued = tcp_queue_length(self.transport)
        if not queued:
            self.transport.loseConnection()
        elif queued < self._close_queued:
            self._close_queued = queued
            self._close_call = self.factory.reactor_clock.callLater(
                CLOSE_TIMEOUT, self._close_timed_out
            )
        else:
            self.transport.abortConnection()

    def _tls_failed(self, reason: Failure) -> None:
        """
        TLS failed (a bad record, a handshake alert): say why to the wrapped
        protocol, send our alert, close TCP.  The peer closing TCP without a
        close_notify is reported as a lost connection, as Twisted does.
        """
        if isinstance(reason.value, Error) and _represents_eof(reason.value):
            reason = Failure(ConnectionLost())
        self._tls_over(reason)

    def _tls_over(self, reason: Failure | None) -> None:
        """TLS is over (L{None}: cleanly); close TCP after sending what OpenSSL has."""
        if self._lost_reason is None:
            self._lost_reason = reason
        self._tls_lost = True
        self._flush_tls_output()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._handshake_steps > 1 and not self.handshake_done:
            # The client sent part of a handshake and left (or timed out): a
            # connect-and-close probe, which sends nothing, is not counted.
            COUNTS.handshake_failed("closed")
        self._handshake_steps = -1
        if not self._tls_lost and self._tls is not None and not self._aborted:
            # What the BIO still holds may be whole records: they go up first.
            # (Not after an abort: nothing is delivered then, and the read
            # would meet the end of TCP as OpenSSL's "unexpected eof", the
            # reason the wrapped protocol would get instead of the abort.)
            self._tls.bio_shutdown()
            self._read_records()
            self._tls_lost = True
        reason = self._lost_reason or reason
        self._lost_reason = None
        self.connected = False
        # Nothing is sent any more (the last read may have made an answer).
        self._waiting = []
        self.factory.end_of_turn.discard(self)
        if self._close_call is not None:
            if self._close_call.active():
                self._close_call.cancel()
            self._close_call = None
        self.wrappedProtocol.connectionLost(reason)
        # The TLS connection refers to us (its app data, the client's
        # verification callback): break the cycle.
        self._tls = None


@implementer(interfaces.IPushProducer)
class _PullAsPush:
    """
    A pull producer driven as a push producer: a cooperative task
    (L{twisted.internet.task.cooperate}) asks it for more, one
    C{resumeProducing} per step, until it unregisters; pausing pauses the task.
    """

    def __init__(self, pull: Any) -> None:
        self._pull = pull
        self._task: Any = None

    def _steps(self) -> Any:
        while True:
            self._pull.resumeProducing()
            yield None

    def start(self) -> None:
        self._task = cooperate(self._steps())
        self._task.whenDone().addErrback(self._ended)

    @staticmethod
    def _ended(failure: Failure) -> None:
        # A task that is stopped (finish, stopProducing) fails its Deferred
        # with TaskStopped: that is how it ends.  Anything else is the
        # producer's own error.
        if not failure.check(TaskStopped):
            _log.failure("a pull producer failed", failure)

    # A task that has ended refuses to stop, pause or resume (TaskFinished),
    # and one that is not paused refuses to resume (NotPaused): either way
    # there is nothing left to do.

    def finish(self) -> None:
        """The producer unregistered: stop asking it."""
        if self._task is not None:
            with suppress(TaskFinished):
                self._task.stop()

    def pauseProducing(self) -> None:
        if self._task is not None:
            with suppress(TaskFinished):
                self._task.pause()

    def resumeProducing(self) -> None:
        if self._task is not None:
            with suppress(TaskFinished, NotPaused):
                self._task.resume()

    def stopProducing(self) -> None:
        self.finish()
        self._pull.stopProducing()


class EndOfTurnSender:
    """
    Sends the small writes of every connection of a factory at the end of the
    reactor turn: one C{callLater(0)} per turn, whatever the number of
    connections and responses (Twisted's own small-write gathering,
    C{BufferingTLSTransport}, costs a C{callLater(0)} per connection).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        # An insertion-ordered set: connections are served in the order they wrote.
        self._waiting: dict[BulkTLSProtocol, None] = {}
        self._call: IDelayedCall | None = None

    def add(self, protocol: BulkTLSProtocol) -> None:
        """C{protocol} has something waiting: send it at the end of this turn."""
        self._waiting[protocol] = None
        if self._call is None:
            self._call = self._clock.callLater(0, self._send_all)

    def discard(self, protocol: BulkTLSProtocol) -> None:
        """C{protocol} is gone: nothing of its is to be sent."""
        self._waiting.pop(protocol, None)

    def _send_all(self) -> None:
        self._call = None
        waiting, self._waiting = self._waiting, {}
        for protocol in waiting:
            try:
                protocol.send_waiting()
            except Exception:
                _log.failure("sending a response failed", protocol=protocol)


class BulkTLSFactory(Factory):
    """
    Makes a L{BulkTLSProtocol} around each protocol C{wrapped} makes.

    @ivar clock: the reactor whose turns L{end_of_turn} follows (the global
        reactor unless set).
    """

    protocol: type[BulkTLSProtocol] = BulkTLSProtocol  # type: ignore[assignment]
    clock: IReactorTime | None = None
    #: Whether this factory serves (its handshakes are counted) or connects.
    server_side = True
    noisy = False
    _end_of_turn: EndOfTurnSender | None = None

    def __init__(self, creator: Any, wrapped: IProtocolFactory) -> None:
        """
        @param creator: a server context factory (C{getContext}) or
            L{IOpenSSLServerConnectionCreator}; for a client, an
            L{twisted.internet.interfaces.IOpenSSLClientConnectionCreator}.
        """
        self.creator = creator
        #: The name Twisted's TLS factory gives it: Twisted's connection
        #: creators look here for the protocols to offer over ALPN.
        self.wrappedFactory = wrapped

    def connection_for(self, protocol: BulkTLSProtocol) -> SSL.Connection:
        """A pyOpenSSL connection on memory BIOs for C{protocol}, as Twisted's TLS makes one."""
        creator = self.creator
        connection: SSL.Connection
        if not self.server_side:
            connection = creator.clientConnectionForTLS(protocol)
            connection.set_connect_state()
        else:
            if IOpenSSLServerConnectionCreator.providedBy(creator):
                connection = creator.serverConnectionForTLS(cast(Any, protocol))
            else:
                connection = SSL.Connection(creator.getContext(), None)
            connection.set_accept_state()
        connection.set_app_data(protocol)
        return connection

    def buildProtocol(self, addr: Any) -> BulkTLSProtocol | None:  # type: ignore[override]
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)

    def startFactory(self) -> None:
        self.wrappedFactory.doStart()

    def stopFactory(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        return _tls_log_prefix(self.wrappedFactory)

    @property
    def reactor_clock(self) -> IReactorTime:
        """L{clock}, or the global reactor."""
        if self.clock is not None:
            return self.clock
        from twisted.internet import reactor

        return cast(IReactorTime, reactor)

    @property
    def end_of_turn(self) -> EndOfTurnSender:
        """Where this factory's connections leave small writes for the end of the turn."""
        if self._end_of_turn is None:
            self._end_of_turn = EndOfTurnSender(self.reactor_clock)
        return self._end_of_turn


def tls_factory(
    context_factory: Any,
    wrapped: IProtocolFactory,
    clock: IReactorTime | None = None,
    client: bool = False,
    protocol: type[BulkTLSProtocol] | None = None,
) -> BulkTLSFactory:
    """
    TLS around C{wrapped}, with the context C{context_factory} gives (a
    connection creator for a C{client}); C{clock} is the reactor whose turns
    small writes wait for; C{protocol}, a subclass of L{BulkTLSProtocol} to
    use instead (L{echotwist.proxy}).
    """
    factory = BulkTLSFactory(context_factory, wrapped)
    factory.clock = clock
    factory.server_side = not client
    if protocol is not None:
        factory.protocol = protocol
    return factory


@implementer(interfaces.IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    TLS over a TCP endpoint (listening or adopted), served by L{BulkTLSFactory}:
    what C{SSL4ServerEndpoint} does with Twisted's own TLS factory.
    """

    def __init__(
        self,
        tcp: interfaces.IStreamServerEndpoint,
        context_factory: Any,
        clock: IReactorTime | None = None,
        protocol: type[BulkTLSProtocol] | None = None,
    ) -> None:
        """
        @param clock: the reactor C{tcp} listens on (the global one if L{None}).
        @param protocol: a subclass of L{BulkTLSProtocol} to serve connections
            with instead (L{echotwist.proxy}).
        """
        self._tcp = tcp
        self._context_factory = context_factory
        self._clock = clock
        self._protocol = protocol

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory = tls_factory(
            self._context_factory, protocolFactory, self._clock, protocol=self._protocol
        )
        return self._tcp.listen(factory)


@implementer(interfaces.IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    TLS over a TCP client endpoint, with L{BulkTLSProtocol}: what
    C{wrapClientTLS} does with Twisted's own TLS protocol.  The load client
    uses it: it must drive a server as fast as the server answers, and it
    makes one small write per request, which waits here for the end of the
    reactor turn and leaves with that turn's other writes.
    """

    def __init__(
        self,
        connection_creator: Any,
        tcp: interfaces.IStreamClientEndpoint,
        clock: IReactorTime | None = None,
    ) -> None:
        """@param clock: the reactor C{tcp} connects with (the global one if L{None})."""
        self._creator = connection_creator
        self._tcp = tcp
        self._clock = clock

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        factory = tls_factory(self._creator, protocolFactory, self._clock, client=True)
        connecting: Deferred[Any] = self._tcp.connect(factory)
        return connecting.addCallback(lambda protocol: protocol.wrappedProtocol)


def listen_tls(
    reactor: Any,
    port: int,
    context_factory: Any,
    backlog: int = 50,
    interface: str = "",
    protocol: type[BulkTLSProtocol] | None = None,
) -> TLSServerEndpoint:
    """
    The endpoint C{SSL4ServerEndpoint(reactor, port, context_factory, ...)} would
    be; C{protocol}: another TLS transport class (L{echotwist.proxy}).
    """
    tcp = endpoints.TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=interface)
    return TLSServerEndpoint(tcp, context_factory, reactor, protocol)
