"""The UDP flow helpers where the layer is not active (this test's process
is in no cgroup the layer covers): the sockets are what a UDP service needs,
bound and connected as the kernel reports them, and the queries on a flow's
socket are the kernel's own answers, mapped to the exceptions."""

import socket
import unittest

import connredir


class UdpFlowTest(unittest.TestCase):
    def setUp(self):
        self.shared = connredir.udp_bind(("127.0.0.1", 0))
        self.addCleanup(self.shared.close)
        self.service = self.shared.getsockname()
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.client.close)
        self.client.bind(("127.0.0.1", 0))
        self.client.settimeout(5)

    def test_the_shared_socket_allows_a_socket_per_flow(self):
        self.assertEqual(self.shared.type, socket.SOCK_DGRAM)
        for option in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
            self.assertEqual(self.shared.getsockopt(socket.SOL_SOCKET, option), 1)

    def test_a_flow_socket_is_bound_to_the_service_and_connected_to_the_client(self):
        self.client.sendto(b"first", self.service)
        data, client = self.shared.recvfrom(65536)
        self.assertEqual(data, b"first")
        for service in (self.service, connredir.Endpoint.parse("%s:%d" % self.service), "%s:%d" % self.service):
            flow = connredir.udp_flow(service, client)
            with flow:
                self.assertEqual(flow.getsockname(), self.service)
                self.assertEqual(flow.getpeername(), self.client.getsockname())
                # The client's later datagrams go to its own socket, the
                # more specific of the two bound there; answers from it
                # come from the service's address.
                self.client.sendto(b"later", self.service)
                flow.settimeout(5)
                self.assertEqual(flow.recv(65536), b"later")
                flow.send(b"answer")
                self.assertEqual(self.client.recvfrom(65536), (b"answer", self.service))

    def test_the_queries_take_a_flow_socket(self):
        flow = connredir.udp_flow(self.service, self.client.getsockname())
        with flow:
            for call in (connredir.query_records, connredir.query_context):
                with self.assertRaises(connredir.NotSupported):
                    call(flow)
            # No onward socket is made for a flow the layer cannot be asked about.
            with self.assertRaises(connredir.NotSupported):
                connredir.udp_connect_onward(flow, ("127.0.0.1", 9))

    def test_a_flow_socket_on_ipv6_takes_an_ipv4_client_as_mapped(self):
        try:
            shared = connredir.udp_bind(("::", 0))
        except OSError as e:  # pragma: no cover - a host without IPv6
            self.skipTest("no IPv6: %s" % e)
        with shared:
            port = shared.getsockname()[1]
            flow = connredir.udp_flow(("::", port), self.client.getsockname())
            with flow:
                self.assertEqual(flow.family, socket.AF_INET6)
                self.assertEqual(flow.getpeername()[:2], ("::ffff:127.0.0.1", self.client.getsockname()[1]))

    def test_addresses_that_are_not_ip_addresses_are_invalid(self):
        for bad in (("not an address", 1), ("127.0.0.1",), "nowhere", 7):
            with self.assertRaises(connredir.InvalidArgument):
                connredir.udp_flow(bad, ("127.0.0.1", 1))
        with self.assertRaises(connredir.InvalidArgument):
            connredir.udp_flow(("127.0.0.1", 0), ("::1", 1))

    def test_the_service_address_must_allow_reuse(self):
        # A socket bound without SO_REUSEPORT keeps the address to itself.
        plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with plain:
            plain.bind(("127.0.0.1", 0))
            with self.assertRaises(OSError):
                connredir.udp_flow(plain.getsockname(), self.client.getsockname())


if __name__ == "__main__":
    unittest.main()
