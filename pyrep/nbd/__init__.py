"""The NBD protocol: messages and states without I/O, the client and the server.

Layers (one way, top to bottom):

- :mod:`pyrep.nbd.proto` — wire constants, layouts, errno mapping;
- :mod:`pyrep.nbd.handshake` — the fixed-newstyle negotiation as a state machine for either role
  (bytes in → events out, events in → bytes out);
- :mod:`pyrep.nbd.transmission` — request and reply encoding/validation (hot path in
  ``pyrep.nbd._wire``, Cython);
- :mod:`pyrep.nbd.export`, :mod:`pyrep.nbd.server` — exports and the server (the only server code that
  touches sockets); ``pyrep.nbd.client`` — the client connection.
"""
from .proto import LocalProtocolError, ProtocolError

__all__ = ["ProtocolError", "LocalProtocolError"]
