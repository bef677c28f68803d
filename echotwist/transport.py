"""
The server's TLS transport: Twisted's memory-BIO TLS, tuned for large bodies.

Twisted's L{TLSMemoryBIOProtocol} moves one TLS record (at most 16 KiB) at a
time in both directions.  On the way in, C{_flushReceiveBIO} hands every
record's plaintext to the protocol stack on its own, so a 1 MiB request body
climbs through the HTTP channel, the transfer decoder and the request some 64
times.  On the way out, C{_write} cuts the data into 16 KiB slices (a copy
each), and after each C{SSL_write} reads the send BIO and calls
C{transport.write} once, so the TCP transport collects 64 pieces to join again
before it sends them, at most C{SEND_LIMIT} (128 KiB) per writable event.  The
plain TCP transport reads at most 64 KiB per C{recv}.

L{BulkTLSProtocol} keeps Twisted's protocol (the handshake, shutdown, producer
and error handling are all Twisted's) and changes only how bytes are batched:

  - the records that one read from the socket brought are decrypted into one
    buffer (C{SSL_read} straight into it, not pyOpenSSL's buffer and copy per
    record) and handed up in one C{dataReceived} call;
  - every write is encrypted at once: without L{twisted.protocols.tls.BufferingTLSTransport}'s
    gathering of small writes per connection, which cost a C{callLater(0)}
    per response, since both our channels already write in batches (HTTP/1.1
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
  - the TCP transport reads up to L{READ_SIZE} bytes per C{recv} and sends up to
    L{SEND_LIMIT} per C{send};
  - the protocol class has no C{__getattr__} (L{_without_attribute_forwarding}),
    so CPython's fast attribute access works on it.

L{BulkTLSFactory} builds these protocols, and L{TLSServerEndpoint} listens
with it where C{SSL4ServerEndpoint} would have used Twisted's own factory.
"""

from __future__ import annotations

from typing import Any, cast

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError, _ffi, _lib
from twisted.internet import endpoints, interfaces, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProtocolFactory, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import classImplements, implementedBy, implementer
from zope.interface.interface import Method

from echotwist.metrics import COUNTS, handshake_failure_reason

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
    tls._raise_ssl_error(ssl, result)
    # SSL_read failed without an error to raise: treat it as "nothing yet".
    raise WantReadError()


def _forwarder(name: str) -> Any:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.transport, name)(*args, **kwargs)

    forward.__name__ = name
    forward.__doc__ = f"C{{{name}}} of the TCP transport underneath."
    return forward


def _without_attribute_forwarding(tls: type, tcp: type) -> type:
    """
    Twisted's TLS protocol class C{tls}, rebuilt on a copy of
    L{ProtocolWrapper} without its C{__getattr__}; the methods of the
    interfaces the TCP transport class C{tcp} implements that C{tls} does not
    define are forwarded one by one instead.

    Why: C{ProtocolWrapper.__getattr__} forwards any attribute the wrapper
    lacks to the transport underneath.  A class with C{__getattr__} anywhere
    in its MRO gets CPython's slow attribute hook for every attribute access,
    found or not, and none of 3.11's specialised attribute and method loads:
    each C{self._x} of the TLS code, and each call the channel makes on its
    transport, takes the slow generic path.  Without it a keep-alive request
    costs ~3% fewer instructions (C{bench/run count}: 433,828 -> 420,547).  What the wrapper
    forwarded and anyone may ask of a transport is in the TCP transport's
    interfaces (L{ProtocolWrapper.makeConnection} declares them on the
    wrapper): C{pauseProducing}, C{getTcpNoDelay}, C{fileno} and so on.

    Twisted's TLS and wrapper methods call their bases explicitly
    (C{ProtocolWrapper.makeConnection(self, ...)}, no C{super()}), so they
    run as they are in the copy; the tests check the copy holds Twisted's
    own functions.
    """
    # Per-class slots and zope's declarations (re-made below) are not copied.
    skip = {"__dict__", "__weakref__", "__getattr__"}
    skip |= {"__implemented__", "__provides__", "__providedBy__"}
    base = ProtocolWrapper
    here = {"__module__": __name__}
    wrapper = type(
        base.__name__,
        base.__bases__,
        {k: v for k, v in vars(base).items() if k not in skip} | here,
    )
    copy = type(
        tls.__name__, (wrapper,), {k: v for k, v in vars(tls).items() if k not in skip} | here
    )
    # Declared as Twisted declares it (zope's mypy plugin cannot see a class
    # made by type(), hence the call through a name).
    declare = classImplements
    declare(copy, *implementedBy(tls))
    for interface in implementedBy(tcp).flattened():
        for name in interface.names():
            if not hasattr(copy, name) and isinstance(interface[name], Method):
                setattr(copy, name, _forwarder(name))
    return copy


_TLSProtocol: type[TLSMemoryBIOProtocol] = _without_attribute_forwarding(
    TLSMemoryBIOProtocol, tcp.Server
)


class BulkTLSProtocol(_TLSProtocol):  # type: ignore[valid-type,misc]
    """
    Twisted's TLS transport, moving bulk data in batches instead of one TLS
    record at a time, and encrypting every write at once.
    """

    #: Small ciphertext waiting for the end of the reactor turn.
    _waiting: list[bytes]
    #: The connection's C{SSL} pointer and memory BIOs (cffi pointers).
    _ssl: Any
    _into_ssl: Any
    _from_ssl: Any

    def makeConnection(self, transport: Any) -> None:
        self._waiting = []
        # Instance attributes of the TCP transport: tcp.Connection.doRead reads
        # bufferSize bytes, writeSomeData sends at most SEND_LIMIT.
        transport.bufferSize = READ_SIZE
        transport.SEND_LIMIT = SEND_LIMIT
        super().makeConnection(transport)
        # The OpenSSL pointers, read once: attribute reads on an SSL.Connection
        # take the slow path (it has a __getattr__).  Nothing goes through
        # our read and write paths before this: application data waits for
        # the handshake, which Twisted's own paths carry.
        tls = self._tlsConnection
        self._ssl = tls._ssl
        self._into_ssl = tls._into_ssl
        self._from_ssl = tls._from_ssl

    # -- handshakes, counted by the server (echotwist.metrics) ----------------

    #: Steps of the handshake taken so far; 0 once it is counted, or on a client.
    _handshake_steps = 0

    def _checkHandshakeStatus(self) -> None:
        """Twisted's handshake step (at connect, then per read until done), counted."""
        super()._checkHandshakeStatus()
        if not self._bulk_factory.server_side or self._handshake_steps < 0:
            return
        self._handshake_steps += 1
        if self._handshakeDone:
            COUNTS.handshake_done()
            self._handshake_steps = -1
        elif self._lostTLSConnection:
            COUNTS.handshake_failed(handshake_failure_reason(self._reason))
            self._handshake_steps = -1

    # -- in -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Ciphertext from the socket.  Once the handshake is done and nothing
        waits to be encrypted, it goes into the BIO with C{BIO_write} directly
        (pyOpenSSL's C{bio_write} checks its argument's type and warns about
        text first) and the records are read at once; everything else is
        Twisted's C{dataReceived}.
        """
        if self._handshakeDone and not self._appSendBuffer:
            into_ssl = self._into_ssl
            result = _lib.BIO_write(into_ssl, _ffi.from_buffer(data), len(data))
            if result <= 0:
                self._tlsConnection._handle_bio_errors(into_ssl, result)
            self._flushReceiveBIO()
            return
        super().dataReceived(data)

    def _flushReceiveBIO(self) -> None:
        """
        Decrypt every record the receive BIO holds and deliver the plaintext in
        one C{dataReceived} call (Twisted delivers each record on its own).

        The records are decrypted straight into one buffer sized for all of
        them (L{_read_plaintext}), which is copied out once: pyOpenSSL's
        C{recv} allocates a buffer per record and copies each out, and the
        records then had to be joined, a second copy of a large body.

        Overrides a private method of L{TLSMemoryBIOProtocol}, called from its
        C{dataReceived} once the handshake is done (pinned by the tests).
        Bounded: the BIO holds at most what one read from the socket brought.
        """
        tls = self._tlsConnection
        ssl, into_ssl = self._ssl, self._into_ssl
        chunks: list[bytes] = []
        while not self._lostTLSConnection:
            try:
                chunk, more = _read_plaintext(tls, ssl, into_ssl)
            except WantReadError:
                break
            except ZeroReturnError:
                # The peer closed TLS: what it sent before that goes up first.
                self._deliver(chunks)
                chunks = []
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
                continue
            except Error:
                failure = Failure()
                self._deliver(chunks)
                chunks = []
                self._tlsShutdownFinished(failure)
                continue
            if chunk:
                chunks.append(chunk)
            if not more:
                break
        self._deliver(chunks)
        # The records read may have produced a reply (e.g. a KeyUpdate); when
        # they did not, small writes stay waiting for the end of the turn.
        if _lib.BIO_get_mem_data(self._from_ssl, _ffi.NULL) > 0:
            self._flushSendBIO()

    def _deliver(self, chunks: list[bytes]) -> None:
        if not chunks or self._aborted:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        ProtocolWrapper.dataReceived(self, data)

    # -- out ----------------------------------------------------------------

    def _write(self, bytes: Any) -> None:
        """
        Encrypt C{bytes} in L{WRITE_CHUNK} slices and hand each slice's
        ciphertext to the TCP transport in one piece.

        Overrides a private method of L{TLSMemoryBIOProtocol} (called by its
        C{write} and when writes buffered during a handshake are let go), with
        the same contract: on C{WantReadError} the rest is buffered with
        C{_bufferedWrite}; on any other OpenSSL error the connection is torn
        down with C{_tlsShutdownFinished}.

        Calls C{SSL_write} directly, like L{_read_plaintext} calls C{SSL_read}:
        pyOpenSSL's C{send} would also look at its three callback helpers and
        the error state after every successful write, where only a failed one
        (C{SSL_write} returning 0 or less) has an error to raise.
        """
        if self._lostTLSConnection:
            return
        ssl = self._ssl
        view = memoryview(bytes)
        total = len(view)
        done = 0
        while done < total:
            piece = view[done : done + WRITE_CHUNK]
            sent = _lib.SSL_write(ssl, _ffi.from_buffer(piece), len(piece))
            if sent <= 0:
                try:
                    self._tlsConnection._raise_ssl_error(ssl, sent)
                except WantReadError:
                    self._bufferedWrite(view[done:].tobytes())
                    break
                except Error:
                    self._tlsShutdownFinished(Failure())
                    break
                # A failure OpenSSL gives no reason for: never loop on it.
                self._tlsShutdownFinished(Failure(Error("SSL_write failed")))
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
        from_ssl = self._from_ssl
        while True:
            buffer = _allocate("char[]", size)
            filled = 0
            while filled < size:
                result = _lib.BIO_read(from_ssl, buffer + filled, size - filled)
                if result <= 0:
                    break
                filled += result
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
        if len(data) < LARGE_WRITE:
            if not self._waiting:
                self._bulk_factory.end_of_turn.add(self)
            self._waiting.append(bytes(data))
            return
        self.send_waiting()
        self._send_now(data)

    def _send_now(self, data: Any) -> None:
        """
        Send C{data} if the TCP transport has nothing queued; queue what the
        kernel does not take.  Reads the transport's private queue
        (C{dataBuffer}, C{offset}, C{_tempDataLen}); pinned by the tests.
        """
        t: Any = self.transport
        if (
            t.connected
            and not t.disconnecting
            and not t._tempDataLen
            and t.offset == len(t.dataBuffer)
        ):
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

    def _flushSendBIO(self) -> None:
        """
        Twisted's own send path (the handshake, the TLS shutdown, alerts):
        what waits for the end of the turn was encrypted earlier, so it goes
        first, and in the same C{send}.

        One send, not two: a response waiting for the end of the turn and
        the close_notify of a connection closed after it (HTTP/1.0,
        C{Connection: close}) would otherwise be two small segments, and
        Nagle's algorithm holds the second until the client's delayed ACK of
        the first, 40 ms later; the client sees the end of the answer that
        late.  (A new connection per request ran at a quarter of its rate.)
        """
        try:
            data = self._tlsConnection.bio_read(2**15)
        except WantReadError:
            data = b""
        if data:
            self._waiting.append(data)
        self.send_waiting()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._handshake_steps > 1 and not self._handshakeDone:
            # The client sent part of a handshake and left (or timed out): a
            # connect-and-close probe, which sends nothing, is not counted.
            COUNTS.handshake_failed("closed")
        self._handshake_steps = -1
        super().connectionLost(reason)
        # Nothing is sent any more (connectionLost above may have delivered a
        # last read, and its answer may be waiting).
        self._waiting = []
        self._bulk_factory.end_of_turn.discard(self)

    @property
    def _bulk_factory(self) -> BulkTLSFactory:
        return cast(BulkTLSFactory, self.factory)


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


class BulkTLSFactory(TLSMemoryBIOFactory):
    """
    A L{TLSMemoryBIOFactory} whose connections are L{BulkTLSProtocol}s.

    @ivar clock: the reactor whose turns L{end_of_turn} follows (the global
        reactor unless set).
    """

    protocol = BulkTLSProtocol
    clock: IReactorTime | None = None
    #: Whether this factory serves (its handshakes are counted) or connects.
    server_side = True
    _end_of_turn: EndOfTurnSender | None = None

    @property
    def end_of_turn(self) -> EndOfTurnSender:
        """Where this factory's connections leave small writes for the end of the turn."""
        if self._end_of_turn is None:
            clock = self.clock
            if clock is None:
                from twisted.internet import reactor

                clock = cast(IReactorTime, reactor)
            self._end_of_turn = EndOfTurnSender(clock)
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
    factory = BulkTLSFactory(context_factory, client, wrapped)
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
