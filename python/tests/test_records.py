"""Parsing and building records, as the Rust library's records.rs tests do."""

import socket
import struct
import unittest

import connredir
from connredir import _abi
from connredir import Client, Context, Endpoint, Hop, Record, RedirectState

RECORD = _abi.connredir_record


def hop(service_id, dst, local=None, time_ns=0):
    return Hop(service_id, time_ns, Endpoint.parse(dst), Endpoint.parse(local) if local else None)


def three_hops():
    return Record.build(
        Client(42, 1000, 7, "curl"),
        tuple(hop(i, "10.0.0.1:443") for i in (1, 2, 3)),
    )


def put(blob, field, fmt, value):
    """`blob` with `field` set to `value` (packed with `fmt`)."""
    at = RECORD.offset(field)
    data = struct.pack(fmt, value)
    return blob[:at] + data + blob[at + len(data) :]


class RecordTest(unittest.TestCase):
    def test_round_trip(self):
        hops = (
            hop(1, "10.0.0.1:443", "127.0.0.1:40000", time_ns=5),
            hop(9, "[2001:db8::1]:80"),
        )
        r = Record.build(Client(42, 1000, 7, "curl"), hops)
        self.assertEqual(len(r.blob), connredir.RECORD_SIZE)
        back = Record.from_bytes(r.to_bytes())
        self.assertEqual(back, r)
        self.assertEqual(back.chain, (1, 9))
        self.assertEqual(back.client, Client(42, 1000, 7, "curl"))
        self.assertEqual(back.hops, hops)
        self.assertEqual(back.version, _abi.CONNREDIR_RECORD_VERSION)
        self.assertIsNone(back.hops[1].local, "family 0 is an unknown local address")
        self.assertEqual(str(back.flow), "127.0.0.1:40000")
        self.assertEqual(back.hops[0].time_ns, 5)

    def test_the_blob_is_the_c_struct(self):
        r = three_hops()
        blob = r.blob
        magic, version, size, hop_count = struct.unpack_from("=IHHH", blob)
        self.assertEqual((magic, version, size, hop_count), (0x52524E43, 3, 568, 3))
        at = RECORD.offset("hops") + _abi.connredir_hop.size + _abi.connredir_hop.offset("original_dst")
        family, port = struct.unpack_from("=HH", blob, at)
        self.assertEqual(family, socket.AF_INET)
        self.assertEqual(blob[at + 2 : at + 4], (443).to_bytes(2, "big"), "ports in network order")
        self.assertEqual(blob[at + 8 : at + 12], bytes([10, 0, 0, 1]))
        comm = RECORD.offset("client_comm")
        self.assertEqual(blob[comm : comm + 5], b"curl\0")

    def test_destinations_v4_and_v6(self):
        r = Record.build(Client(1, 0, 0))
        self.assertIsNone(r.original_destination)
        self.assertIsNone(r.first_destination)
        self.assertIsNone(r.flow)
        r = Record.build(Client(1, 0, 0), (hop(1, "192.0.2.1:443"), hop(2, "[2001:db8::2]:8443")))
        self.assertEqual(str(r.first_destination), "192.0.2.1:443")
        self.assertEqual(str(r.original_destination), "[2001:db8::2]:8443")
        self.assertEqual(r.original_destination.sockaddr, ("2001:db8::2", 8443, 0, 0))
        self.assertEqual(r.first_destination.sockaddr, ("192.0.2.1", 443))
        self.assertEqual(r.original_destination.family, socket.AF_INET6)
        scoped = Endpoint.parse("[fe80::1%3]:22")
        self.assertEqual(Endpoint.from_bytes(scoped.to_bytes()), scoped)
        self.assertEqual(str(scoped), "[fe80::1%3]:22")

    def test_rejects_bad_blobs(self):
        good = three_hops().blob
        bad = {
            "short blob": good[: connredir.RECORD_V1_SIZE - 1],
            "empty blob": b"",
            "bad magic": b"XXXX" + good[4:],
            "version 0": put(good, "version", "=H", 0),
            "version too new": put(good, "version", "=H", _abi.CONNREDIR_RECORD_VERSION + 1),
            "9 hops": put(good, "hop_count", "=H", _abi.CONNREDIR_MAX_HOPS + 1),
            "size past the blob": put(good, "size", "=H", len(good) + 1),
            "size under v1": put(good, "size", "=H", 8),
            "a version 3 blob cut short": put(good, "size", "=H", connredir.RECORD_V2_SIZE)[
                : connredir.RECORD_V2_SIZE
            ],
        }
        for what, blob in bad.items():
            with self.subTest(what):
                with self.assertRaises(connredir.InvalidArgument) as caught:
                    Record.from_bytes(blob)
                self.assertIsInstance(caught.exception, OSError)

    def test_a_longer_blob_reads_up_to_what_is_known(self):
        good = three_hops().blob
        longer = put(good + bytes(16), "size", "=H", len(good) + 16)
        r = Record.from_bytes(longer)
        self.assertEqual(r.chain, (1, 2, 3))
        self.assertEqual(r.blob, longer, "carried as read")

    def test_version_1_blobs_read_without_a_command(self):
        r = three_hops()
        v1 = put(put(r.blob, "version", "=H", 1), "size", "=H", connredir.RECORD_V1_SIZE)
        back = Record.from_bytes(v1[: connredir.RECORD_V1_SIZE])
        self.assertEqual(back.chain, r.chain)
        self.assertIsNone(back.client.command)
        self.assertEqual(back.version, 1)
        # What follows a version 1 blob is no command, even when present.
        self.assertIsNone(Record.from_bytes(v1).client.command)
        # A version 2 blob must be whole.
        short = put(r.blob, "size", "=H", connredir.RECORD_V1_SIZE)[: connredir.RECORD_V1_SIZE]
        with self.assertRaises(connredir.InvalidArgument):
            Record.from_bytes(short)

    def test_the_seal_is_carried_as_read(self):
        issued = put(three_hops().blob, "seal", "=Q", 0x0123456789ABCDEF)
        read = Record.from_bytes(issued)
        self.assertEqual(read.seal, 0x0123456789ABCDEF)
        self.assertEqual(read.to_bytes(), issued, "carried byte for byte")
        self.assertEqual(three_hops().seal, 0, "built records are unsealed")
        # A version 2 blob ends before the seal: nothing after it is one.
        v2 = put(put(issued, "version", "=H", 2), "size", "=H", connredir.RECORD_V2_SIZE)
        self.assertEqual(Record.from_bytes(v2).seal, 0)
        self.assertEqual(Record.from_bytes(v2[: connredir.RECORD_V2_SIZE]).chain, (1, 2, 3))
        with self.assertRaises(connredir.InvalidArgument):
            Record.from_bytes(v2[: connredir.RECORD_V2_SIZE - 1])

    def test_long_commands_are_cut_to_what_the_kernel_keeps(self):
        r = Record.build(Client(1, 2, 3, "a-very-long-command-name"))
        self.assertEqual(r.client.command, "a-very-long-com")

    def test_states(self):
        r = three_hops()
        self.assertEqual(r.state_for(3), RedirectState.REDIRECTED_BY_SELF)
        self.assertEqual(r.state_for(1), RedirectState.PREVIOUSLY_REDIRECTED_BY_SELF)
        self.assertEqual(r.state_for(2), RedirectState.PREVIOUSLY_REDIRECTED_BY_SELF)
        self.assertEqual(r.state_for(7), RedirectState.REDIRECTED_BY_OTHER)
        self.assertEqual(
            Record.build(Client(0, 0, 0)).state_for(1), RedirectState.NOT_REDIRECTED
        )

    def test_a_full_chain_refuses_another_hop(self):
        hops = tuple(hop(i, "10.0.0.1:1") for i in range(_abi.CONNREDIR_MAX_HOPS))
        self.assertEqual(len(Record.build(Client(0, 0, 0), hops).hops), _abi.CONNREDIR_MAX_HOPS)
        with self.assertRaises(connredir.InvalidArgument):
            Record.build(Client(0, 0, 0), hops + (hop(99, "10.0.0.1:1"),))


class ContextTest(unittest.TestCase):
    def context(self, remote, local):
        return Context(remote + local)

    def test_default_context_decodes(self):
        remote = Endpoint.parse("192.0.2.7:8443")
        local = Endpoint.parse("127.0.0.1:40000")
        unknown = bytes(_abi.connredir_endpoint.size)
        self.assertEqual(
            self.context(remote.to_bytes(), local.to_bytes()).original_addresses(), (remote, local)
        )
        self.assertEqual(
            self.context(remote.to_bytes(), unknown).original_addresses(), (remote, None)
        )
        odd_family = struct.pack("=H", 7) + unknown[2:]
        self.assertIsNone(self.context(remote.to_bytes(), odd_family).original_addresses())
        self.assertIsNone(self.context(unknown, unknown).original_addresses(), "no remote")
        # A service's own context: not a default context, whatever its size.
        self.assertIsNone(Context(b"policy").original_addresses())
        self.assertIsNone(Context(remote.to_bytes() + local.to_bytes() + b"\0").original_addresses())


if __name__ == "__main__":
    unittest.main()
