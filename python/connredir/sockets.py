"""The socket options of the layer, on the standard socket module.

Every call is one getsockopt/setsockopt on the private level
CONNREDIR_SOL, answered by the layer's BPF programs (or, for the original
destination, SOL_IP/SOL_IPV6 SO_ORIGINAL_DST as transparent proxies ask).
Sockets may be given as socket.socket objects, objects with fileno(), or
descriptors (which stay open and owned by the caller).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import ipaddress
import socket
import struct
from typing import Iterator, Union

from . import _abi
from .errors import (
    InsufficientBuffer,
    InvalidArgument,
    LayerNotActive,
    NotListening,
    NotRedirected,
    NotRegistered,
    NotSupported,
    from_errno,
)
from .records import AF_INET, AF_INET6, RECORD_SIZE, Context, Endpoint, Record, RedirectState

#: Something that is, or names, a socket.
SocketLike = Union[socket.socket, int, "HasFileno"]

#: The most bytes one getsockopt of the socket module can read (CPython
#: refuses larger buffers).
_MOST = 1024
#: The largest context: a service's own (CONNREDIR_MAX_CONTEXT) or the
#: default one, whichever is larger.
_CONTEXT_MAX = max(_abi.CONNREDIR_MAX_CONTEXT, _abi.connredir_default_context.size)
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", socket.IPPROTO_IPV6)


class HasFileno:  # pragma: no cover - a typing aid only
    """Anything with a fileno() method."""

    def fileno(self) -> int:
        """The descriptor."""
        raise NotImplementedError


@contextlib.contextmanager
def _socket(sock: SocketLike) -> Iterator[socket.socket]:
    """`sock` as a socket.socket; a descriptor is wrapped for the call only."""
    if isinstance(sock, socket.socket):
        yield sock
        return
    fd = sock if isinstance(sock, int) else sock.fileno()
    try:
        wrapped = socket.socket(fileno=fd)
    except OSError as e:
        raise from_errno(e) from None
    try:
        yield wrapped
    finally:
        # The descriptor stays the caller's.
        wrapped.detach()


def _getsockopt(sock: socket.socket, level: int, option: int, size: int) -> bytes:
    try:
        return sock.getsockopt(level, option, size)
    except OSError as e:
        raise from_errno(e) from None


def _query(sock: SocketLike, option: int, size: int) -> bytes:
    """A query of the private level, with a buffer of `size` bytes, then
    larger ones while the layer answers ENOBUFS (a newer layer's larger
    answer)."""
    with _socket(sock) as s:
        while True:
            try:
                return _getsockopt(s, _abi.CONNREDIR_SOL, option, size)
            except OSError as e:
                if e.errno != _errno.ENOBUFS:
                    raise
                if size >= _MOST:
                    raise InsufficientBuffer(None) from None
                size = min(size * 2, _MOST)


def query_records(sock: SocketLike) -> Record:
    """The redirect records of an accepted connection (one getsockopt).

    Raises NotRedirected when the connection has none, NotSupported where the
    layer does not cover the socket, NotConnected, NotASocket.
    """
    return Record.from_bytes(_query(sock, _abi.CONNREDIR_SO_RECORDS, RECORD_SIZE))


def query_context(sock: SocketLike) -> Context:
    """The redirect context of an accepted connection, for the service that
    redirected it (now or earlier): AccessDenied for any other."""
    return Context(_query(sock, _abi.CONNREDIR_SO_CONTEXT, _CONTEXT_MAX))


def redirect_state(sock: SocketLike, service_id: int) -> RedirectState:
    """The state of an accepted connection as service `service_id` sees it;
    NOT_REDIRECTED when it has no records."""
    try:
        return query_records(sock).state_for(service_id)
    except NotRedirected:
        return RedirectState.NOT_REDIRECTED


def set_records(sock: SocketLike, records: Union[Record, bytes]) -> None:
    """Hands records (a Record, or a blob) to a new socket, before it
    connects. Only root and registered services' processes may; a
    service's process only a record the layer issued to its service, as it
    was read (AccessDenied otherwise)."""
    blob = records.to_bytes() if isinstance(records, Record) else bytes(records)
    with _socket(sock) as s:
        try:
            s.setsockopt(_abi.CONNREDIR_SOL, _abi.CONNREDIR_SO_RECORDS, blob)
        except OSError as e:
            raise from_errno(e) from None


def _decode_sockaddr(data: bytes) -> Endpoint:
    """A sockaddr_in or sockaddr_in6 as the kernel writes it; an IPv4-mapped
    address as IPv4."""
    if len(data) < 4:
        raise InvalidArgument(f"a {len(data)}-byte answer is not a socket address")
    family = struct.unpack("=H", data[:2])[0]
    port = int.from_bytes(data[2:4], "big")
    if family == AF_INET and len(data) >= 8:
        return Endpoint(AF_INET, str(ipaddress.IPv4Address(data[4:8])), port)
    if family == AF_INET6 and len(data) >= 28:
        ip = ipaddress.IPv6Address(data[8:24])
        if ip.ipv4_mapped is not None:
            return Endpoint(AF_INET, str(ip.ipv4_mapped), port)
        scope_id = struct.unpack("=I", data[24:28])[0]
        return Endpoint(AF_INET6, str(ip), port, scope_id)
    raise InvalidArgument(f"a {len(data)}-byte answer of family {family} is not an IP address")


def original_destination(sock: SocketLike) -> Endpoint:
    """The original destination of an accepted connection, the way
    transparent proxies ask for it (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST)."""
    with _socket(sock) as s:
        if s.family == socket.AF_INET6:
            levels = [
                (_SOL_IPV6, _abi.CONNREDIR_IP6T_SO_ORIGINAL_DST, 28),
                (_SOL_IP, _abi.CONNREDIR_SO_ORIGINAL_DST, 16),
            ]
        else:
            levels = [(_SOL_IP, _abi.CONNREDIR_SO_ORIGINAL_DST, 16)]
        # Report the first telling failure; "not supported" only when every
        # level said so.
        failure: OSError = NotSupported("no level answered SO_ORIGINAL_DST")
        for level, option, size in levels:
            try:
                return _decode_sockaddr(_getsockopt(s, level, option, size))
            except OSError as e:
                if isinstance(failure, NotSupported):
                    failure = e
        raise failure


def registered_service(listener: SocketLike) -> int:
    """The id of the service registered for a listening socket's address,
    so a proxy can tell at start-up that the layer will send it connections.

    Raises NotRegistered when no service listens at that address,
    LayerNotActive when the layer does not cover the caller's cgroup, and
    NotListening before listen().
    """
    with _socket(listener) as s:
        try:
            answer = s.getsockopt(_abi.CONNREDIR_SOL, _abi.CONNREDIR_SO_SERVICE, 4)
        except OSError as e:
            if e.errno == _errno.ENOENT:
                raise NotRegistered(_address(s)) from None
            if e.errno in (_errno.EOPNOTSUPP, _errno.ENOPROTOOPT):
                raise LayerNotActive(_address(s)) from None
            if e.errno == _errno.EINVAL:
                raise NotListening("the socket is not listening: ask after listen()") from None
            raise from_errno(e) from None
        if len(answer) != 4:
            raise InvalidArgument(f"the service id answer is {len(answer)} bytes, not 4")
        return int(struct.unpack("=I", answer)[0])


def is_accelerated(sock: SocketLike) -> bool:
    """Whether the socket's data bypasses the TCP stack (sockmap
    acceleration, for services registered with `accelerate`): read such a
    socket with recv(), not splice(). NotSupported where the layer is not
    active."""
    with _socket(sock) as s:
        answer = _getsockopt(s, _abi.CONNREDIR_SOL, _abi.CONNREDIR_SO_ACCELERATED, 4)
    return struct.unpack("=I", answer.ljust(4, b"\0")[:4])[0] != 0


def _address(s: socket.socket) -> str:
    """The socket's own address, "ip:port" (IPv4-mapped as IPv4)."""
    name = s.getsockname()
    if s.family == socket.AF_INET6:
        ip = ipaddress.IPv6Address(name[0].split("%", 1)[0])
        if ip.ipv4_mapped is not None:
            return f"{ip.ipv4_mapped}:{name[1]}"
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"
