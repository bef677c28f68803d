"""Minimal aiohttp peer for the echotwist contract (bench only).

POST /echo with `Token: <t>` or `Authorization: Bearer <t>` echoes the body with the request's
Content-Type; otherwise 401 (decided before the body is read).  Other methods on /echo get 405
with `Allow: POST` (aiohttp's router), other paths 404.  TLS 1.2/1.3, ECDHE + AEAD, HTTP/1.1.

    python aiohttp_echo.py --port P --cert server.pem --key server.key
                           [--token T | env ECHOTWIST_TOKEN]
                           [--max-body BYTES] [--access-log FILE]
"""

import hmac
import logging
import ssl
import sys

import peer_args
from aiohttp import web

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="echotwist"'}


def make_app(token: str, max_body: int) -> web.Application:
    expected = token.encode()

    def authorized(request: web.Request) -> bool:
        got = request.headers.get("Token")
        if got is None:
            auth = request.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                got = auth[7:].strip()
        return got is not None and hmac.compare_digest(got.encode(), expected)

    async def echo(request: web.Request) -> web.Response:
        if not authorized(request):
            return web.Response(status=401, text="unauthorized\n", headers=UNAUTHORIZED_HEADERS)
        # request.read() raises 413 (HTTPRequestEntityTooLarge) past client_max_size
        body = await request.read()
        ctype = request.headers.get("Content-Type") or "application/octet-stream"
        return web.Response(body=body, headers={"Content-Type": ctype})

    app = web.Application(client_max_size=max_body)
    app.router.add_post("/echo", echo)
    return app


def make_tls(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def main(argv=None) -> int:
    p = peer_args.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--access-log", default=None, help="file for one line per request (default: none)"
    )
    a = peer_args.parse(p, argv)
    access_log = None
    if a.access_log:
        access_log = logging.getLogger("aiohttp.access")
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
        access_log.addHandler(logging.FileHandler(a.access_log))
    print(f"aiohttp peer on https://{a.host}:{a.port}/echo", flush=True)
    web.run_app(
        make_app(a.token, a.max_body),
        host=a.host,
        port=a.port,
        ssl_context=make_tls(a.cert, a.key),
        access_log=access_log,
        print=None,
        handle_signals=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
