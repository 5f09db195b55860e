"""UDP flows, seen from a service.

UDP has no accept(). A service receives a client's first datagram on its
socket bound to the service address (`udp_bind`), then opens a socket of its
own for that client: bound to the same address (SO_REUSEADDR, SO_REUSEPORT)
and connected to the client's address (`udp_flow`). That connect() is where
the layer finds the client's flow: from then on the socket answers
`query_records`, `query_context`, `original_destination` and
`redirect_state` as an accepted TCP socket does, and receives the client's
later datagrams. The onward socket gets the records before it connects
(`udp_connect_onward`), and the chain goes on as for TCP::

    shared = connredir.udp_bind(("127.0.0.1", 15053))
    data, client = shared.recvfrom(65536)
    flow = connredir.udp_flow(shared.getsockname(), client)
    dst = connredir.original_destination(flow)
    onward = connredir.udp_connect_onward(flow, dst)
    onward.send(data)
    # relay: flow <-> onward; answer the client from `flow`
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Tuple, Union

from .errors import InvalidArgument, NotRedirected
from .records import AF_INET, AF_INET6, Endpoint
from .sockets import SocketLike, query_records, set_records

#: An address: an Endpoint, "ip:port" / "[ip6]:port" text, or a tuple as
#: the socket module gives and takes it ((host, port) or (host, port,
#: flowinfo, scope_id)).
Address = Union[Endpoint, str, Tuple]


def _endpoint(addr: Address) -> Endpoint:
    """`addr` as an Endpoint (InvalidArgument when it is not an IP address)."""
    if isinstance(addr, Endpoint):
        return addr
    try:
        if isinstance(addr, str):
            return Endpoint.parse(addr)
        host, port = addr[0], int(addr[1])
        scope_id = int(addr[3]) if len(addr) > 3 else 0
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except (ValueError, TypeError, IndexError) as e:
        raise InvalidArgument(f"{addr!r} is not an IP socket address: {e}") from None
    family = AF_INET if ip.version == 4 else AF_INET6
    return Endpoint(family, str(ip), port, scope_id if family == AF_INET6 else 0)


def _reusable(at: Endpoint) -> socket.socket:
    """A UDP socket of `at`'s family with SO_REUSEADDR and SO_REUSEPORT."""
    sock = socket.socket(at.family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        sock.close()
        raise
    return sock


def udp_bind(service: Address) -> socket.socket:
    """The service's shared UDP socket: bound to `service` (its registered
    address) with SO_REUSEADDR and SO_REUSEPORT, as `udp_flow` needs the
    socket that receives first datagrams to be. The caller owns it."""
    at = _endpoint(service)
    sock = _reusable(at)
    try:
        sock.bind(at.sockaddr)
    except OSError:
        # The system call's own error: not an answer of the layer.
        sock.close()
        raise
    return sock


def udp_flow(service: Address, client: Address) -> socket.socket:
    """The service's own socket for `client`'s flow: bound to `service`
    (where the client's datagram arrived) with SO_REUSEADDR and
    SO_REUSEPORT, and connected to `client`. The query calls take it as
    they take an accepted TCP socket (NotRedirected when the flow was not
    redirected), and it receives the client's later datagrams; answer the
    client from it. The shared socket must have been bound with both
    options, by the same user (`udp_bind`). The caller owns it."""
    at, to = _endpoint(service), _endpoint(client)
    sock = _reusable(at)
    try:
        sock.bind(at.sockaddr)
        sock.connect(to.sockaddr if to.family == at.family else _mapped(to, at.family))
    except OSError:
        sock.close()
        raise
    return sock


def _mapped(to: Endpoint, family: int) -> Tuple:
    """An IPv4 client for an IPv6 socket, as IPv4-mapped IPv6 (an IPv6
    client for an IPv4 socket cannot be: InvalidArgument)."""
    if family == AF_INET6 and to.family == AF_INET:
        return ("::ffff:" + to.address, to.port, 0, 0)
    raise InvalidArgument(f"an IPv4 socket cannot reach {to}")


def udp_connect_onward(flow: SocketLike, destination: Address) -> socket.socket:
    """A UDP socket to `destination` carrying the records of the flow whose
    socket is `flow` (none when it was not redirected), connected: its
    datagrams meet the next service of the chain, or the destination, never
    this service again. The caller owns it."""
    to = _endpoint(destination)
    try:
        records = query_records(flow)
    except NotRedirected:
        records = None
    onward = socket.socket(to.family, socket.SOCK_DGRAM)
    try:
        if records is not None:
            # Before connect: the layer decides a connected UDP socket at
            # connect(), from the records it carries.
            set_records(onward, records)
        onward.connect(to.sockaddr)
    except OSError:
        onward.close()
        raise
    return onward
