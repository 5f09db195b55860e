"""connredir for Python: what an inspection proxy asks of the connredir
redirect layer, on the standard socket module alone.

A redirect service accepts a connection the layer sent it, then::

    import socket
    import connredir

    client, _ = listener.accept()
    records = connredir.query_records(client)            # carry it on, byte for byte
    dst = connredir.original_destination(client)         # SO_ORIGINAL_DST
    onward = socket.socket(dst.family, socket.SOCK_STREAM)
    connredir.set_records(onward, records)               # before connect
    onward.connect(dst.sockaddr)
    # inspect and relay between client and onward

The records name the services that already handled the flow, so the onward
connection goes to the next service, or to the destination, never back.

A UDP service has no accept(): for each new client it opens a socket of its
own, bound to the service address and connected to the client
(`udp_flow`), asks the same calls on it, and sends onward from a socket
that carries the records (`udp_connect_onward`); see `connredir.udp`.
The option numbers and layouts come from uapi.h (`connredir._abi`, made by
`cargo run -p connredir-abi-codegen`).
"""

from . import _abi
from .errors import (
    AccessDenied,
    ConnredirError,
    InsufficientBuffer,
    InvalidArgument,
    LayerNotActive,
    NotASocket,
    NotConnected,
    NotListening,
    NotRedirected,
    NotRegistered,
    NotSupported,
    ServiceError,
)
from .records import (
    RECORD_SIZE,
    RECORD_V1_SIZE,
    RECORD_V2_SIZE,
    Client,
    Context,
    Endpoint,
    Hop,
    Record,
    RedirectState,
)
from .sockets import (
    is_accelerated,
    original_destination,
    query_context,
    query_records,
    redirect_state,
    registered_service,
    set_records,
)
from .udp import udp_bind, udp_connect_onward, udp_flow

#: The private socket option level.
SOL_CONNREDIR = _abi.CONNREDIR_SOL
#: get: the redirect records; set: hand records to a new socket.
SO_RECORDS = _abi.CONNREDIR_SO_RECORDS
#: get: the redirect context (only for the service that redirected).
SO_CONTEXT = _abi.CONNREDIR_SO_CONTEXT
#: get, on a listening socket: the id of the service registered there.
SO_SERVICE = _abi.CONNREDIR_SO_SERVICE
#: get: whether the socket is accelerated (4-byte 0 or 1).
SO_ACCELERATED = _abi.CONNREDIR_SO_ACCELERATED

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "Client",
    "ConnredirError",
    "Context",
    "Endpoint",
    "Hop",
    "InsufficientBuffer",
    "InvalidArgument",
    "LayerNotActive",
    "NotASocket",
    "NotConnected",
    "NotListening",
    "NotRedirected",
    "NotRegistered",
    "NotSupported",
    "RECORD_SIZE",
    "RECORD_V1_SIZE",
    "RECORD_V2_SIZE",
    "Record",
    "RedirectState",
    "SOL_CONNREDIR",
    "SO_ACCELERATED",
    "SO_CONTEXT",
    "SO_RECORDS",
    "SO_SERVICE",
    "ServiceError",
    "is_accelerated",
    "original_destination",
    "query_context",
    "query_records",
    "redirect_state",
    "registered_service",
    "set_records",
    "udp_bind",
    "udp_connect_onward",
    "udp_flow",
]
