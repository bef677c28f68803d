"""
twistd plugin for echotwist: C{twistd echo --port PORT}.

A thin shell: everything lives in L{echotwist.service}, imported only when
C{twistd echo} actually runs.
"""

from twisted.application.service import ServiceMaker

echo = ServiceMaker(
    "echotwist",
    "echotwist.service",
    "Token-protected HTTPS echo service (POST /echo returns the body verbatim)",
    "echo",
)
