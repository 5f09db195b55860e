"""What can go wrong, in the terms of the WFP control codes: one exception
class per errno answer the layer documents (README, "The syscall interface").

Every class is an OSError whose `errno` is the one the kernel gave (or, for
checks made here before any system call, the one the kernel would give), so
code that catches OSError keeps working.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Optional


class ConnredirError(OSError):
    """Base of every error of this package."""

    #: The errno this class stands for when no system call gave one.
    default_errno = 0

    def __init__(self, message: str, errno: Optional[int] = None) -> None:
        code = self.default_errno if errno is None else errno
        super().__init__(code, message)


class InsufficientBuffer(ConnredirError):
    """The buffer is too small (ENOBUFS). `needed` is the size needed when
    known: the socket module cannot pass the NULL buffer that asks the layer
    for it, so a query retries with larger buffers up to the 1024 bytes
    the socket module reads, and raises this past them."""

    default_errno = _errno.ENOBUFS

    def __init__(self, needed: Optional[int]) -> None:
        what = f"{needed} bytes are needed" if needed is not None else "the answer is larger"
        super().__init__(f"buffer too small: {what}")
        #: The size needed, or None when unknown.
        self.needed = needed


class InvalidArgument(ConnredirError):
    """A malformed argument: a buffer under 4 bytes, a blob that is not a
    record, or records set on a socket already connected (EINVAL, EISCONN)."""

    default_errno = _errno.EINVAL


class NotConnected(ConnredirError):
    """The socket is not connected: query an accepted connection (ENOTCONN)."""

    default_errno = _errno.ENOTCONN


class NotASocket(ConnredirError):
    """The descriptor is not a socket (ENOTSOCK)."""

    default_errno = _errno.ENOTSOCK


class NotSupported(ConnredirError):
    """The redirect layer does not cover this socket: no `connredir up`, or
    the process is not in a cgroup it is attached to (EOPNOTSUPP, and
    ENOPROTOOPT, the kernel's own answer for an unknown level)."""

    default_errno = _errno.EOPNOTSUPP


class AccessDenied(ConnredirError):
    """The caller may not do this: setting records needs root or a
    registered service's process, which may set only a record the layer
    issued to its service, unchanged; the context is only for the service
    that redirected the flow (EACCES, EPERM)."""

    default_errno = _errno.EACCES


class NotRedirected(ConnredirError):
    """The connection was not redirected: it has no records (ENOENT)."""

    default_errno = _errno.ENOENT


class ServiceError(ConnredirError):
    """Why `registered_service` found no service for a listener."""


class NotRegistered(ServiceError):
    """The layer is active, but no service is registered for the listening
    address `address` (ENOENT): no connection will be redirected to it."""

    default_errno = _errno.ENOENT

    def __init__(self, address: str) -> None:
        super().__init__(
            f"no connredir service is registered for {address}: register one that listens "
            f"there (`connredir service add --name NAME --listen {address} "
            f"--cgroup DIR|--uid UID|--pid PID`, or a [[service]] with "
            f'listen = ["{address}"] in the configuration)'
        )
        #: The listener's address, "ip:port".
        self.address = address


class LayerNotActive(ServiceError):
    """The redirect layer does not cover the caller: no `connredir up`, or
    the process is not in a cgroup of its scope (EOPNOTSUPP)."""

    default_errno = _errno.EOPNOTSUPP

    def __init__(self, address: str) -> None:
        super().__init__(
            f"the connredir layer is not active for this process (checked on {address}): "
            "is `connredir up` running, and is this process in a cgroup of its scope?"
        )
        #: The listener's address, "ip:port".
        self.address = address


class NotListening(ServiceError):
    """The socket is not listening: ask after listen() (EINVAL)."""

    default_errno = _errno.EINVAL


_BY_ERRNO = {
    _errno.ENOTCONN: (NotConnected, "the socket is not connected: query an accepted connection"),
    _errno.ENOTSOCK: (NotASocket, "the descriptor is not a socket"),
    _errno.EOPNOTSUPP: (
        NotSupported,
        "not supported: the connredir layer is not loaded for this socket's cgroup "
        "(is `connredir up` running, and is this process in an attached cgroup?)",
    ),
    _errno.ENOPROTOOPT: (
        NotSupported,
        "not supported: the connredir layer is not loaded for this socket's cgroup "
        "(is `connredir up` running, and is this process in an attached cgroup?)",
    ),
    _errno.EACCES: (
        AccessDenied,
        "access denied: only root or a registered service's process may set records "
        "(and only records the layer issued to its service, unchanged), and only the "
        "service that redirected a connection may read its context",
    ),
    _errno.EPERM: (AccessDenied, "access denied"),
    _errno.ENOENT: (
        NotRedirected,
        "the connection was not redirected: it has no redirect records",
    ),
    _errno.EINVAL: (
        InvalidArgument,
        "the redirect layer rejected the request: a records blob that is malformed, "
        "truncated or of an unsupported version, or a buffer under 4 bytes",
    ),
    _errno.EISCONN: (
        InvalidArgument,
        "the socket is already connected: set records before connect",
    ),
}


def from_errno(err: OSError) -> OSError:
    """The exception an errno answer means here; other errors come back as
    they are."""
    if isinstance(err, ConnredirError) or err.errno not in _BY_ERRNO:
        return err
    cls, message = _BY_ERRNO[err.errno]
    return cls(f"{message} ({os.strerror(err.errno)})", err.errno)
