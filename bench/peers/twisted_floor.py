"""The floor under echotwist: Twisted's reactor and TLS with the least HTTP on top (bench only).

Not a server anyone should run: it exists to measure what Twisted + pyOpenSSL cost per request
before any web framework, so that echotwist's figures can be read against the ceiling of the
stack it is built on.  The same reactor (epoll), the same TLS transport
(`TLSMemoryBIOProtocol` over `SSL4ServerEndpoint`) and echotwist's own TLS context factory
(same versions, suites, groups and certificate); on top, per connection, a few lines that split a
request head at CRLFs, check the token, and echo a `Content-Length` body with its Content-Type,
written as one buffer.  No `twisted.web`, no access log, no timeouts, no HTTP/2, no chunked
bodies (answered 411), no pipelining subtleties beyond what the contract check needs.

    python twisted_floor.py --port P --cert server.pem --key server.key
                            [--token T | env ECHOTWIST_TOKEN] [--max-body BYTES]

It must run in a venv with echotwist installed (for `echotwist.tls`).
"""

from __future__ import annotations

import hmac

import peer_args
from twisted.internet import endpoints, reactor
from twisted.internet.protocol import Factory, Protocol

from echotwist.tls import server_context_factory

STATUS = {
    401: b"401 Unauthorized",
    404: b"404 Not Found",
    405: b"405 Method Not Allowed",
    411: b"411 Length Required",
    413: b"413 Payload Too Large",
    400: b"400 Bad Request",
}


class FloorEcho(Protocol):
    token: bytes = b""
    max_body = 64 * 1024 * 1024

    def connectionMade(self) -> None:
        self.buffer = b""
        self.need = -1  # body bytes still to come for the current request, -1: reading a head
        self.head: dict[bytes, bytes] = {}
        self.status = 200

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer:
            if self.need < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                if not self.read_head(head):
                    return
            if len(self.buffer) < self.need:
                return
            body, self.buffer = self.buffer[: self.need], self.buffer[self.need :]
            self.need = -1
            self.answer(body)

    def read_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self.refuse(400)
            return False
        method, path, version = parts
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        self.head = fields
        self.keep_alive = (
            fields.get(b"connection", b"").lower() != b"close"
            if version == b"HTTP/1.1"
            else fields.get(b"connection", b"").lower() == b"keep-alive"
        )
        self.status = 200
        if path.split(b"?", 1)[0] != b"/echo":
            self.status = 404
        elif method != b"POST":
            self.status = 405
        else:
            got = fields.get(b"token")
            if got is None:
                auth = fields.get(b"authorization", b"")
                got = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
            if got is None or not hmac.compare_digest(got, self.token):
                self.status = 401
        length = fields.get(b"content-length")
        if length is None:
            if b"transfer-encoding" in fields:
                self.refuse(411)
                return False
            self.need = 0
        elif not length.isdigit():
            self.refuse(400)
            return False
        else:
            self.need = int(length)
            if self.status == 200 and self.need > self.max_body:
                self.status = 413
        if self.status != 200:
            self.refuse(self.status)
            return False
        return True

    def answer(self, body: bytes) -> None:
        ctype = self.head.get(b"content-type") or b"application/octet-stream"
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nServer: floor\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (ctype, len(body), body)
        )
        if not self.keep_alive:
            self.transport.loseConnection()
            self.buffer = b""

    def refuse(self, status: int) -> None:
        extra = b""
        if status == 401:
            extra = b'WWW-Authenticate: Bearer realm="echotwist"\r\n'
        elif status == 405:
            extra = b"Allow: POST\r\n"
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %s\r\n%sConnection: close\r\nContent-Length: 0\r\n\r\n"
            % (STATUS[status], extra)
        )
        self.transport.loseConnection()
        self.buffer = b""


def main() -> None:
    a = peer_args.parse(peer_args.parser(__doc__.splitlines()[0]))
    FloorEcho.token = a.token.encode()
    FloorEcho.max_body = a.max_body
    endpoint = endpoints.SSL4ServerEndpoint(
        reactor, a.port, server_context_factory(a.cert, a.key), backlog=1024, interface=a.host
    )
    endpoint.listen(Factory.forProtocol(FloorEcho))
    print(f"twisted floor listening on https://{a.host}:{a.port}/echo", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
