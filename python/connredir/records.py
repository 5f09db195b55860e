"""The redirect records of a connection, typed: parsed with `struct` from the
layouts in `_abi` (generated from uapi.h), never from offsets written here.

To a proxy a record is an opaque blob to carry from the accepted socket to
the onward one, byte for byte (its last field is a seal the layer checks);
`Record` keeps the blob as read (`Record.blob`) and reads it for logging and
policy.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from . import _abi
from .errors import InvalidArgument

#: Size of the record blob this version writes.
RECORD_SIZE = _abi.connredir_record.size
#: Size of a version 1 blob, the smallest valid one: everything before the
#: client's command, which version 2 added.
RECORD_V1_SIZE = _abi.connredir_record.offset("client_comm")
#: Size of a version 2 blob: everything before the seal, which version 3 added.
RECORD_V2_SIZE = _abi.connredir_record.offset("seal")

_ENDPOINT = _abi.connredir_endpoint
_HOP = _abi.connredir_hop
_RECORD = _abi.connredir_record
_CONTEXT = _abi.connredir_default_context

AF_INET = int(socket.AF_INET)
AF_INET6 = int(socket.AF_INET6)


@dataclass(frozen=True)
class Endpoint:
    """An IPv4 or IPv6 socket address, as a record or context holds it."""

    #: socket.AF_INET or socket.AF_INET6.
    family: int
    #: The address as text ("192.0.2.1", "2001:db8::1").
    address: str
    #: The port, in host order.
    port: int
    #: The IPv6 scope id; 0 for IPv4.
    scope_id: int = 0

    @classmethod
    def from_bytes(cls, data: bytes) -> Optional["Endpoint"]:
        """Reads a `struct connredir_endpoint`; None when the family is
        unknown (0: the layer did not know the address)."""
        family, port, scope_id, addr = _ENDPOINT.format.unpack(data[: _ENDPOINT.size])
        # The port is in network byte order, read here as a host-order u16.
        port = socket.ntohs(port)
        if family == AF_INET:
            return cls(AF_INET, str(ipaddress.IPv4Address(addr[:4])), port)
        if family == AF_INET6:
            return cls(AF_INET6, str(ipaddress.IPv6Address(addr)), port, scope_id)
        return None

    def to_bytes(self) -> bytes:
        """The `struct connredir_endpoint` of this address."""
        if self.family == AF_INET:
            addr = ipaddress.IPv4Address(self.address).packed + bytes(12)
        else:
            addr = ipaddress.IPv6Address(self.address).packed
        return _ENDPOINT.format.pack(self.family, socket.htons(self.port), self.scope_id, addr)

    @classmethod
    def parse(cls, text: str) -> "Endpoint":
        """An endpoint from "ip:port" or "[ip6]:port" text."""
        host, _, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        scope_id = 0
        if "%" in host:
            host, scope = host.split("%", 1)
            scope_id = int(scope)
        ip = ipaddress.ip_address(host)
        family = AF_INET if ip.version == 4 else AF_INET6
        return cls(family, str(ip), int(port), scope_id)

    @property
    def sockaddr(self) -> Union[Tuple[str, int], Tuple[str, int, int, int]]:
        """The address as the socket module takes it: (host, port) for IPv4,
        (host, port, flowinfo, scope_id) for IPv6."""
        if self.family == AF_INET:
            return (self.address, self.port)
        return (self.address, self.port, 0, self.scope_id)

    def __str__(self) -> str:
        if self.family == AF_INET:
            return f"{self.address}:{self.port}"
        scope = f"%{self.scope_id}" if self.scope_id else ""
        return f"[{self.address}{scope}]:{self.port}"


@dataclass(frozen=True)
class Hop:
    """One redirect in the chain: which service took the flow, and where the
    flow was going."""

    #: The id of the service that took the connection.
    service_id: int
    #: When it happened: nanoseconds since boot (CLOCK_BOOTTIME); 0 in
    #: records built by hand.
    time_ns: int
    #: Where the connection was going before this redirect; None in the
    #: unlikely case the layer could not record it.
    original_dst: Optional[Endpoint]
    #: The redirected socket's own address, when known.
    local: Optional[Endpoint]

    @classmethod
    def from_bytes(cls, data: bytes) -> "Hop":
        """Reads a `struct connredir_hop`."""
        service_id, _reserved, time_ns, dst, local = _HOP.format.unpack(data[: _HOP.size])
        return cls(service_id, time_ns, Endpoint.from_bytes(dst), Endpoint.from_bytes(local))

    def to_bytes(self) -> bytes:
        """The `struct connredir_hop` of this hop."""
        unknown = bytes(_ENDPOINT.size)
        return _HOP.format.pack(
            self.service_id,
            0,
            self.time_ns,
            self.original_dst.to_bytes() if self.original_dst else unknown,
            self.local.to_bytes() if self.local else unknown,
        )


@dataclass(frozen=True)
class Client:
    """The process that opened the flow."""

    #: Process id (thread group id).
    pid: int
    #: User id.
    uid: int
    #: cgroup v2 id.
    cgroup_id: int
    #: The command name (comm) of the thread that connected; None when
    #: unknown (version 1 records, records built by hand).
    command: Optional[str] = None


class RedirectState(enum.Enum):
    """The state of a connection as one service sees it (WFP's
    FWPS_CONNECTION_REDIRECT_STATE)."""

    #: No service redirected the connection.
    NOT_REDIRECTED = "not_redirected"
    #: The service redirected it last: it is the one handling it now.
    REDIRECTED_BY_SELF = "redirected_by_self"
    #: Other services redirected it; this one never did.
    REDIRECTED_BY_OTHER = "redirected_by_other"
    #: The service redirected it earlier, and another service since.
    PREVIOUSLY_REDIRECTED_BY_SELF = "previously_redirected_by_self"


@dataclass(frozen=True)
class Record:
    """The redirect records of a connection: the chain of services that
    redirected it so far (oldest first), and the process that opened it.

    `blob` is the bytes as read; `set_records` hands exactly these on. A
    service's process may set only a record the layer issued to its service,
    unchanged: the layer seals each record it hands out. Records made with
    `Record.build` are unsealed, and only root may set them.
    """

    #: The version the blob was written in (1 to CONNREDIR_RECORD_VERSION).
    version: int
    #: The record's flags (reserved, 0 today).
    flags: int
    #: Who opened the flow.
    client: Client
    #: The redirects, oldest first.
    hops: Tuple[Hop, ...]
    #: The layer's seal (0 in version 1 and 2 blobs and in records built by
    #: hand); opaque: only the layer can check it.
    seal: int
    #: The blob as read, to pass on byte for byte.
    blob: bytes

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Record":
        """Parses a blob: checks the magic, the version (1 to the current
        one), the size field and the hop count. A longer blob (a newer minor
        version) is read up to what this version knows. Raises
        InvalidArgument when the blob is not a record."""
        blob = bytes(blob)
        if len(blob) < RECORD_V1_SIZE:
            raise InvalidArgument(
                f"records blob is {len(blob)} bytes; a valid one has at least {RECORD_V1_SIZE}"
            )
        padded = blob[:RECORD_SIZE].ljust(RECORD_SIZE, b"\0")
        (
            magic,
            version,
            size,
            hop_count,
            flags,
            pid,
            uid,
            _reserved,
            cgroup_id,
            hops,
            comm,
            seal,
        ) = _RECORD.format.unpack(padded)
        if magic != _abi.CONNREDIR_RECORD_MAGIC:
            raise InvalidArgument("records blob does not start with the connredir magic")
        if version == 0 or version > _abi.CONNREDIR_RECORD_VERSION:
            raise InvalidArgument(
                f"records version {version} is not supported "
                f"(this library reads 1 to {_abi.CONNREDIR_RECORD_VERSION})"
            )
        least = {1: RECORD_V1_SIZE, 2: RECORD_V2_SIZE}.get(version, RECORD_SIZE)
        if size < least or size > len(blob):
            raise InvalidArgument(
                f"records size field says {size} bytes, blob has {len(blob)} "
                f"(version {version} has at least {least})"
            )
        if hop_count > _abi.CONNREDIR_MAX_HOPS:
            raise InvalidArgument(
                f"records claim {hop_count} hops; at most {_abi.CONNREDIR_MAX_HOPS} exist"
            )
        # Whatever follows a version 1 blob is not a command, nor what
        # follows a version 2 blob a seal.
        command = None
        if version >= 2:
            name = comm.split(b"\0", 1)[0]
            command = name.decode("utf-8", "replace") if name else None
        if version <= 2:
            seal = 0
        element = _HOP.size
        parsed = tuple(
            Hop.from_bytes(hops[i * element : (i + 1) * element]) for i in range(hop_count)
        )
        return cls(version, flags, Client(pid, uid, cgroup_id, command), parsed, seal, blob)

    @classmethod
    def build(cls, client: Client, hops: Tuple[Hop, ...] = ()) -> "Record":
        """An unsealed record of the current version (for tools and tests
        that make records by hand; the layer makes the real ones)."""
        if len(hops) > _abi.CONNREDIR_MAX_HOPS:
            raise InvalidArgument(f"a chain holds at most {_abi.CONNREDIR_MAX_HOPS} hops")
        hop_bytes = b"".join(h.to_bytes() for h in hops).ljust(
            _RECORD.field("hops").size, b"\0"
        )
        comm = (client.command or "").encode()[: _RECORD.field("client_comm").size - 1]
        blob = _RECORD.format.pack(
            _abi.CONNREDIR_RECORD_MAGIC,
            _abi.CONNREDIR_RECORD_VERSION,
            RECORD_SIZE,
            len(hops),
            0,
            client.pid,
            client.uid,
            0,
            client.cgroup_id,
            hop_bytes,
            comm,
            0,
        )
        return cls.from_bytes(blob)

    def to_bytes(self) -> bytes:
        """The blob, as `set_records` takes it: the bytes as read."""
        return self.blob

    @property
    def chain(self) -> Tuple[int, ...]:
        """The ids of the services that redirected the connection, in order."""
        return tuple(h.service_id for h in self.hops)

    @property
    def original_destination(self) -> Optional[Endpoint]:
        """Where the connection was going when it was redirected to the
        current service (the last hop's destination): what a proxy connects
        to."""
        return self.hops[-1].original_dst if self.hops else None

    @property
    def first_destination(self) -> Optional[Endpoint]:
        """Where the client first wanted to go (the first hop's destination)."""
        return self.hops[0].original_dst if self.hops else None

    @property
    def flow(self) -> Optional[Endpoint]:
        """The flow's id: the address of the socket that opened it (the first
        hop's local address), the same for every service on the chain."""
        return self.hops[0].local if self.hops else None

    def state_for(self, service_id: int) -> RedirectState:
        """The connection's state from the point of view of `service_id`."""
        chain = self.chain
        if not chain:
            return RedirectState.NOT_REDIRECTED
        if chain[-1] == service_id:
            return RedirectState.REDIRECTED_BY_SELF
        if service_id in chain:
            return RedirectState.PREVIOUSLY_REDIRECTED_BY_SELF
        return RedirectState.REDIRECTED_BY_OTHER


@dataclass(frozen=True)
class Context:
    """The redirect context: bytes the redirecting side chose for its
    service, or by default the original destination and local address."""

    #: The raw bytes.
    data: bytes

    def original_addresses(self) -> Optional[Tuple[Endpoint, Optional[Endpoint]]]:
        """Decodes the default context: (original destination, original local
        address or None). None when the bytes are not a default context."""
        if len(self.data) != _CONTEXT.size:
            return None
        remote, local = _CONTEXT.format.unpack(self.data)
        # The local address may be unknown (family 0), never another family.
        local_family = _ENDPOINT.format.unpack(local)[0]
        if local_family not in (0, AF_INET, AF_INET6):
            return None
        remote_endpoint = Endpoint.from_bytes(remote)
        if remote_endpoint is None:
            return None
        return remote_endpoint, Endpoint.from_bytes(local)
