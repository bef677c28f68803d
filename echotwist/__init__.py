"""
echotwist: a concurrent HTTPS echo service on Twisted, and the client that checks it.

The server is a twistd plugin (C{twistd -n echo --port 8000}); the client is the
C{echotwist-client} command.  See README.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
