"""The floor of the twisted.web design: a stock Site and a leaf Resource that echoes (bench only).

Not a server anyone should run: it measures what twisted.web itself costs per request, so that
echotwist's figures can be read against the ceiling of the design the issue keeps (a
`twisted.web` `Resource` served by `twisted.web.server.Site`).  It runs on echotwist's own TLS
transport and context factory (`echotwist.transport.listen_tls`, `echotwist.tls`), so between
this and echotwist only what echotwist adds above twisted.web differs; between this and
`twisted_floor.py` only twisted.web.  On top, a `Resource` whose `render_POST` checks the token
and returns the body: no access log (the stock `Site` logs nothing without a log path), no
header or body deadlines, no strict parsing, no connection cap, no early refusal, no HTTP/2
(ALPN still offers h2: the load generators here do not ask for it).

    python twisted_web_floor.py --port P --cert server.pem --key server.key
                                [--token T | env ECHOTWIST_TOKEN] [--max-body BYTES]

It must run in a venv with echotwist installed.
"""

from __future__ import annotations

import hmac

import peer_args
from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource

from echotwist.tls import server_context_factory
from echotwist.transport import listen_tls


class Echo(Resource):
    isLeaf = True
    token: bytes = b""
    max_body = 64 * 1024 * 1024

    def render_POST(self, request: server.Request) -> bytes:
        if request.path != b"/echo":
            request.setResponseCode(404)
            return b""
        got = request.getHeader(b"token")
        if got is None:
            auth = request.getHeader(b"authorization") or b""
            got = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
        if got is None or not hmac.compare_digest(got, self.token):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="echotwist"')
            return b""
        body = request.content.read()  # type: ignore[union-attr]
        if len(body) > self.max_body:
            request.setResponseCode(413)
            return b""
        request.setHeader(
            b"content-type", request.getHeader(b"content-type") or b"application/octet-stream"
        )
        return body


def main() -> None:
    a = peer_args.parse(peer_args.parser(__doc__.splitlines()[0]))
    Echo.token = a.token.encode()
    Echo.max_body = a.max_body
    site = server.Site(Echo())
    endpoint = listen_tls(
        reactor, a.port, server_context_factory(a.cert, a.key), backlog=1024, interface=a.host
    )
    endpoint.listen(site)
    print(f"twisted.web floor listening on https://{a.host}:{a.port}/echo", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
