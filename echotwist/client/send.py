"""
One exchange: POST a body to C{/echo}, read the answer, compare the bytes.

Used by C{echotwist-client send} and, through L{post_echo}, by the load run.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from echotwist.client.outcome import StatusError

USER_AGENT = b"echotwist-client"


def echo_url(host: str) -> bytes:
    """The endpoint URL for a base URL such as C{https://localhost:8000}."""
    return (host.rstrip("/") + "/echo").encode("ascii")


def request_headers(token: str | None, content_type: bytes | None = None) -> Headers:
    """
    The headers of an echo request: the token, as the original sent it (none
    when a client certificate alone authenticates, C{--auth mtls}).
    """
    headers = Headers({b"user-agent": [USER_AGENT]})
    if token is not None:
        headers.setRawHeaders(b"token", [token.encode("ascii")])
    if content_type is not None:
        headers.setRawHeaders(b"content-type", [content_type])
    return headers


@implementer(IBodyProducer)
class BytesProducer:
    """
    A body already in memory, written in one go.

    L{FileBodyProducer} would schedule its writes on a cooperator, one reactor
    turn per request; the body is in memory anyway, so write it at once.  The
    exact length makes the request carry C{Content-Length}.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


async def post_echo(agent: IAgent, url: bytes, headers: Headers, body: bytes) -> bytes:
    """
    POST C{body} and return the response body; raise L{StatusError} for a
    status other than 200.
    """
    response: IResponse = await agent.request(b"POST", url, headers, BytesProducer(body))
    received: bytes = await readBody(response)
    if response.code != 200:
        raise StatusError(response.code, response.phrase, received)
    return received


@dataclass(frozen=True)
class Difference:
    """How a response differs from its request."""

    sent: int
    received: int
    offset: int

    def __str__(self) -> str:
        return (
            f"response differs from request: sent {self.sent} bytes, received "
            f"{self.received}, first difference at byte {self.offset}"
        )


def compare(sent: bytes, received: bytes) -> Difference | None:
    """L{None} when the bytes are equal, else where they first differ."""
    if sent == received:
        return None
    offset = next(
        (i for i, (a, b) in enumerate(zip(sent, received, strict=False)) if a != b),
        min(len(sent), len(received)),
    )
    return Difference(len(sent), len(received), offset)


async def send_once(
    reactor: IReactorTime,
    agent: Agent,
    host: str,
    token: str | None,
    body: bytes,
    timeout: float,
    content_type: bytes | None = None,
) -> bytes:
    """One bounded exchange: the whole of it, connect to last byte, within C{timeout}."""
    exchange = Deferred.fromCoroutine(
        post_echo(agent, echo_url(host), request_headers(token, content_type), body)
    )
    exchange.addTimeout(timeout, reactor)
    return await exchange
