"""The HTTP side of the upgrade.

head.py          the request head: parse it and check the upgrade (sans-I/O, no sockets)
extensions.py    permessage-deflate passed through: the offers, the answer's checks (sans-I/O)
forwarding.py    the headers sent to the backend (end-to-end headers, X-Forwarded-*, identity)
handshake.py     the handshake protocol and the phase driver: read head -> route ->
                 identify -> admit -> dial -> answer, each phase returning a verdict
"""
