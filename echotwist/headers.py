"""
Request and response headers: Twisted's L{Headers}, with the common case short.

twisted.web looks headers up by name some twenty times per request (the
request's own headers as they arrive and as the request is answered, the
response's as they are set and written).  Every call canonicalises the name
through L{twisted.web.http_headers._NameEncoder.encode}, a Python call even
when the name is in its cache, and every value set goes through
C{_sanitizeLinearWhitespace}, another call and a C{splitlines}/C{join} pair
even when there is no line break to replace: about a tenth of the Python calls
of a small request.

L{EchoHeaders} answers the common case (a L{bytes} name Twisted has already
canonicalised, L{bytes} values without CR or LF) straight from Twisted's own
cache and storage, and hands everything else (text names, a name seen for the
first time, a value to sanitise) to L{Headers} itself, so what it stores and
returns is what L{Headers} would.  A property test holds the two to the same
answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, AnyStr, TypeVar

from twisted.web.http_headers import Headers, _nameEncoder

_T = TypeVar("_T")

#: Twisted's cache of canonical header names (name as given -> canonical
#: bytes), filled by its encoder and bounded by it; read here, never written.
_CANONICAL: dict[Any, bytes] = _nameEncoder._canonicalHeaderCache


class EchoHeaders(Headers):
    """L{Headers} with a short path for canonical L{bytes} names and plain values."""

    __slots__ = ()

    def getRawHeaders(self, name: AnyStr, default: _T | None = None) -> Any:
        key = _CANONICAL.get(name)
        if key is None or type(name) is not bytes:
            return super().getRawHeaders(name, default)
        return self._rawHeaders.get(key) or default

    def hasHeader(self, name: AnyStr) -> bool:
        key = _CANONICAL.get(name)
        if key is None:
            return super().hasHeader(name)
        return key in self._rawHeaders

    def removeHeader(self, name: AnyStr) -> None:
        key = _CANONICAL.get(name)
        if key is None:
            super().removeHeader(name)
        else:
            self._rawHeaders.pop(key, None)

    def setRawHeaders(self, name: str | bytes, values: Sequence[str | bytes]) -> None:
        key = _CANONICAL.get(name)
        if key is not None:
            plain: list[bytes] = []
            for value in values:
                if type(value) is not bytes or b"\r" in value or b"\n" in value:
                    break
                plain.append(value)
            else:
                self._rawHeaders[key] = plain
                return
        super().setRawHeaders(name, values)

    def addRawHeader(self, name: str | bytes, value: str | bytes) -> None:
        key = _CANONICAL.get(name)
        if key is None or type(value) is not bytes or b"\r" in value or b"\n" in value:
            super().addRawHeader(name, value)
        else:
            self._rawHeaders.setdefault(key, []).append(value)
