"""
The C{echotwist-client} command: C{send} one message and verify it, C{load} many.
"""
