"""The socket calls where the layer is not active (this test's process is
in no cgroup the layer covers): the kernel's own answers, mapped to the
exceptions; and the errno table."""

import errno
import os
import socket
import unittest

import connredir
from connredir.errors import from_errno


def connected():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stream = socket.create_connection(listener.getsockname())
    return listener, stream


class WithoutTheLayerTest(unittest.TestCase):
    def test_a_pipe_is_not_a_socket(self):
        read, write = os.pipe()
        try:
            for call in (
                connredir.query_records,
                connredir.query_context,
                connredir.original_destination,
                connredir.registered_service,
                lambda fd: connredir.set_records(fd, connredir.Record.build(connredir.Client(0, 0, 0))),
            ):
                with self.assertRaises(connredir.NotASocket):
                    call(read)
            os.fstat(read)  # still open: the caller's
        finally:
            os.close(read)
            os.close(write)

    def test_the_level_is_not_supported(self):
        listener, stream = connected()
        with listener, stream:
            for call in (connredir.query_records, connredir.query_context, connredir.is_accelerated):
                with self.assertRaises(connredir.NotSupported):
                    call(stream)
            with self.assertRaises(connredir.NotSupported):
                connredir.query_records(stream.fileno())
            stream.getpeername()  # the descriptor is still the socket's
            onward = socket.socket()
            with onward, self.assertRaises(connredir.NotSupported):
                connredir.set_records(onward, connredir.Record.build(connredir.Client(0, 0, 0)))
        self.assertIn("not loaded", str(from_errno(OSError(errno.EOPNOTSUPP, "x"))))

    def test_original_destination_falls_back_to_the_kernel(self):
        # Without the layer the kernel answers: ENOPROTOOPT without
        # conntrack, ENOENT or the real destination with it.
        listener, stream = connected()
        with listener, stream:
            try:
                dst = connredir.original_destination(stream)
            except (connredir.NotSupported, connredir.NotRedirected):
                return
            self.assertEqual(dst.sockaddr, listener.getsockname())

    def test_no_service_is_registered_anywhere(self):
        listener = socket.socket()
        with listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            address = "%s:%d" % listener.getsockname()
            with self.assertRaises(connredir.LayerNotActive) as caught:
                connredir.registered_service(listener)
            self.assertEqual(caught.exception.address, address)
            self.assertIn(address, str(caught.exception))
        self.assertIn("--listen 127.0.0.1:9", str(connredir.NotRegistered("127.0.0.1:9")))

    def test_redirect_state_needs_the_layer(self):
        listener, stream = connected()
        with listener, stream, self.assertRaises(connredir.NotSupported):
            connredir.redirect_state(stream, 1)


class ErrnoTest(unittest.TestCase):
    def test_errnos_map_to_errors(self):
        table = {
            errno.ENOTCONN: connredir.NotConnected,
            errno.ENOTSOCK: connredir.NotASocket,
            errno.EOPNOTSUPP: connredir.NotSupported,
            errno.ENOPROTOOPT: connredir.NotSupported,
            errno.EACCES: connredir.AccessDenied,
            errno.EPERM: connredir.AccessDenied,
            errno.ENOENT: connredir.NotRedirected,
            errno.EINVAL: connredir.InvalidArgument,
            errno.EISCONN: connredir.InvalidArgument,
        }
        for code, cls in table.items():
            with self.subTest(errno.errorcode[code]):
                err = from_errno(OSError(code, os.strerror(code)))
                self.assertIsInstance(err, cls)
                self.assertIsInstance(err, connredir.ConnredirError)
                self.assertEqual(err.errno, code)
        self.assertIn("before connect", str(from_errno(OSError(errno.EISCONN, "x"))))
        other = OSError(errno.EIO, "x")
        self.assertIs(from_errno(other), other)

    def test_insufficient_buffer(self):
        err = connredir.InsufficientBuffer(600)
        self.assertEqual((err.errno, err.needed), (errno.ENOBUFS, 600))
        self.assertIsNone(connredir.InsufficientBuffer(None).needed)


if __name__ == "__main__":
    unittest.main()
