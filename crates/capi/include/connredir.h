/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * libconnredir: what a redirect service (an inspection proxy) written in C
 * calls to take part in connredir, the Linux form of WFP connection
 * redirection. Build with `pkg-config --cflags --libs connredir`.
 *
 * A service accepts a connection the layer redirected to it, reads its
 * redirect records (an opaque blob) and, if it redirected the flow, its
 * redirect context; it sets the records on its onward socket before
 * connecting to the original destination. The next service, or the
 * destination, follows from the records: independent proxies inspect one
 * flow in turn, once each.
 *
 * Every layout and option number shared with the layer is defined once, in
 * <connredir/uapi.h> (struct connredir_record, struct
 * connredir_default_context, CONNREDIR_MAX_CONTEXT, ...), included here.
 * <connredir/wfp.h> adds the Windows names (SIO_*, WSAIoctl, WSAE*) for
 * code ported from Windows.
 *
 * Errors. Every function returns 0 on success and a negative errno value on
 * failure, and also sets errno to the positive value (so both `rc < 0 &&
 * rc == -ENOBUFS` and `rc < 0 && errno == ENOBUFS` work). The values, with
 * their WFP counterparts:
 *
 *   ENOBUFS     the output buffer is too small; the size needed is returned
 *               (ERROR_INSUFFICIENT_BUFFER)
 *   EINVAL      an output buffer of 1 to 3 bytes (smaller than a ULONG), an
 *               unknown control code, a malformed, truncated or unsupported
 *               records blob, a set on a socket already connected, an
 *               output size other than 0 for a set (WSAEINVAL)
 *   EFAULT      a NULL pointer where a buffer or a result is needed (WSAEFAULT)
 *   ENOTCONN    the socket is not connected (WSAENOTCONN)
 *   ENOTSOCK    the descriptor is not a socket (WSAENOTSOCK); the
 *               WSAIoctl-compatible call also answers it for a descriptor
 *               that is not open
 *   EOPNOTSUPP  the layer does not cover this socket: no `connredir up`, or
 *               the process is not in a cgroup of its scope (WSAEOPNOTSUPP)
 *   EACCES      records may be set only by root and by a registered
 *               service's processes, and those may set only records the
 *               layer issued to their service, unchanged; the context is
 *               only for the service that redirected the flow (WSAEACCES)
 *   ENOENT      the connection was not redirected: it has no records (no
 *               WFP counterpart: a socket WFP did not redirect has no
 *               records either)
 *   other       as the system call answered (EBADF, ...)
 *
 * The calls are synchronous and thread-safe; none keeps the descriptor.
 * They cover redirected TCP connections and UDP flows alike: a UDP
 * service opens a socket of its own for each client's flow
 * (connredir_udp_flow_open), and every query call below takes that socket
 * as it takes an accepted TCP connection ("accepted connection" below
 * means either).
 */
#ifndef CONNREDIR_H
#define CONNREDIR_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <connredir/uapi.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- The WSAIoctl-compatible call. */

/* The Windows control codes (mstcpip.h) connredir_ioctl takes. */
#define CONNREDIR_SIO_QUERY_RECORDS 0x980000DCu /* SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS */
#define CONNREDIR_SIO_QUERY_CONTEXT 0x980000DDu /* SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT */
#define CONNREDIR_SIO_SET_RECORDS 0x980000DEu /* SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS */

/*
 * WSAIoctl for the three WFP connection-redirect control codes, with the
 * buffer protocol of their reference pages. `*bytes_returned` is always
 * written (0 unless said otherwise); NULL is EFAULT.
 *
 * CONNREDIR_SIO_QUERY_RECORDS, CONNREDIR_SIO_QUERY_CONTEXT (on an accepted
 * connection; `in` and `in_len` are unused):
 *   out_len 0          success, *bytes_returned = the size needed
 *   out_len 1..3       EINVAL (smaller than a ULONG), *bytes_returned = 0
 *   out_len too small  ENOBUFS, *bytes_returned = the size needed
 *   otherwise          success, the blob in `out`, *bytes_returned = its size
 * The context is only for the service that redirected the flow (EACCES).
 *
 * CONNREDIR_SIO_SET_RECORDS (on a new socket, before connect): `in` holds
 * the records blob exactly as queried, `out_len` must be 0 (EINVAL).
 */
int connredir_ioctl(int fd, uint32_t code, const void *in, uint32_t in_len, void *out,
		    uint32_t out_len, uint32_t *bytes_returned);

/* ---- Records and context, by socket option. */

/*
 * The records blob of an accepted connection into buf (len bytes), with
 * the same buffer protocol as connredir_ioctl: len 0 puts the size needed
 * in *size; 1..3 is EINVAL; too small is ENOBUFS with the size needed in
 * *size; otherwise *size is the size of the blob. buf may be NULL when len
 * is 0. The blob is at most sizeof(struct connredir_record) bytes.
 */
int connredir_query_records(int fd, void *buf, size_t len, size_t *size);

/*
 * The redirect context of an accepted connection, with the buffer protocol
 * of connredir_query_records; only for the service that redirected the
 * flow, now or earlier (EACCES otherwise). It is the context registered
 * with the service (at most CONNREDIR_MAX_CONTEXT bytes) or else a struct
 * connredir_default_context (see connredir_context_addresses).
 */
int connredir_query_context(int fd, void *buf, size_t len, size_t *size);

/* Sets a records blob, exactly as queried, on a new socket before connect. */
int connredir_set_records(int fd, const void *blob, size_t len);

/*
 * Where an accepted connection was going (SO_ORIGINAL_DST or
 * IP6T_SO_ORIGINAL_DST, answered from the records): a sockaddr_in or
 * sockaddr_in6 in *addr. *addr_len is its size on input and the address's
 * size on output (the address is cut to fit, as getsockname does).
 */
int connredir_original_destination(int fd, struct sockaddr *addr, socklen_t *addr_len);

/* ---- The records blob, read (no system call). */

/*
 * Checks a blob (magic, version 1 to CONNREDIR_RECORD_VERSION, sizes, hop
 * count) and copies it to *out in the current layout: older versions read
 * as the current one (no command, no seal). EINVAL when malformed. For
 * reading only: set the blob as queried, never *out (the seal would not
 * match).
 */
int connredir_records_parse(const void *blob, size_t len, struct connredir_record *out);

/* The state of a connection as one service sees it (WFP's
 * FWPS_CONNECTION_REDIRECT_STATE, in the same order). */
enum connredir_redirect_state {
	/* No service redirected the connection. */
	CONNREDIR_NOT_REDIRECTED = 0,
	/* The service redirected it last: it is the one handling it now. */
	CONNREDIR_REDIRECTED_BY_SELF = 1,
	/* Other services redirected it; this one never did. */
	CONNREDIR_REDIRECTED_BY_OTHER = 2,
	/* The service redirected it earlier, and another service since. */
	CONNREDIR_PREVIOUSLY_REDIRECTED_BY_SELF = 3,
};

/*
 * The redirect state of a records blob for `service_id` (see
 * connredir_registered_service). A NULL blob of length 0 (the connection
 * had no records: ENOENT from the query) is CONNREDIR_NOT_REDIRECTED.
 */
int connredir_redirect_state(const void *blob, size_t len, uint32_t service_id,
			     enum connredir_redirect_state *state);

/*
 * Where the connection was going when it was redirected to the current
 * service (the last hop's destination, what a proxy connects to), as a
 * sockaddr_in or sockaddr_in6; *addr_len as for
 * connredir_original_destination. ENOENT without hops.
 */
int connredir_records_original_destination(const void *blob, size_t len, struct sockaddr *addr,
					    socklen_t *addr_len);

/* Where the client first wanted to go (the first hop's destination). */
int connredir_records_first_destination(const void *blob, size_t len, struct sockaddr *addr,
					 socklen_t *addr_len);

/*
 * Decodes a default redirect context (struct connredir_default_context):
 * the original destination into *remote, the redirected socket's local
 * address into *local (*local_len 0 when unknown); lengths as for
 * connredir_original_destination. EINVAL when the bytes are not a default
 * context (the service registered a context of its own).
 */
int connredir_context_addresses(const void *context, size_t len, struct sockaddr *remote,
				socklen_t *remote_len, struct sockaddr *local,
				socklen_t *local_len);

/* ---- The service. */

/*
 * The id of the service registered for a listening socket's address: ask
 * after listen() to know that the layer will send connections here.
 * ENOENT when no service is registered there, EOPNOTSUPP when the layer
 * does not cover this process, EINVAL when the socket does not listen.
 * The layer answers for a listening TCP socket and for a bound UDP
 * socket (a UDP service asks on the socket bound to its address); EINVAL
 * for a socket that is neither.
 */
int connredir_registered_service(int listen_fd, uint32_t *service_id);

/* ---- UDP flows. */

/*
 * UDP has no accept(): a UDP service receives a client's first datagram on
 * its socket bound to the service address with SO_REUSEADDR and
 * SO_REUSEPORT (recvfrom gives the client's address), then opens a socket
 * of its own for that client. This call makes it: a UDP socket bound to
 * `service` (the registered address, where the datagram arrived) with
 * SO_REUSEADDR and SO_REUSEPORT, and connected to `client`; its descriptor
 * goes to *fd_out (-1 on failure), close-on-exec, the caller's to close.
 * Its connect() is where the layer finds the client's flow: from then on
 * connredir_ioctl, connredir_query_records, connredir_query_context and
 * connredir_original_destination answer on it as on an accepted TCP
 * connection (ENOENT when the flow was not redirected), and the kernel
 * delivers the client's later datagrams to it. Answer the client from this
 * socket: datagrams sent from the shared one show the service's address.
 * The shared socket must have been bound with both options, by the same
 * user. `service` and `client` are sockaddr_in or sockaddr_in6 (EINVAL
 * otherwise).
 */
int connredir_udp_flow_open(const struct sockaddr *service, socklen_t service_len,
			    const struct sockaddr *client, socklen_t client_len, int *fd_out);

/*
 * The onward socket of the flow on `flow_fd` (from connredir_udp_flow_open):
 * a new UDP socket with the flow's records set (when it has any; none when
 * it was not redirected), then connected to `destination` (usually its
 * original destination); its descriptor goes to *fd_out (-1 on failure).
 * Its datagrams meet the next service, or the destination, never this
 * service again. A service that makes its own onward socket does the same:
 * connredir_set_records before connect() or the first sendto().
 */
int connredir_udp_connect_onward(int flow_fd, const struct sockaddr *destination,
				 socklen_t destination_len, int *fd_out);

/* ---- Acceleration (services registered with `accelerate`). */

/*
 * *accelerated = 1 when the socket's data bypasses TCP (read it with
 * read()/recv(), never splice()), else 0.
 */
int connredir_is_accelerated(int fd, int *accelerated);

/*
 * Asks the layer to send what from_fd's peer writes from now on straight to
 * to_fd's peer; `received` is every byte read from from_fd so far, all
 * already written to to_fd. EAGAIN while bytes are in flight (read and
 * forward them, then ask again), EOPNOTSUPP when a leg is not accelerated,
 * EACCES when the sockets are not both the caller's service's, EALREADY
 * when done already.
 */
int connredir_cut_through(int from_fd, int to_fd, uint64_t received);

/* All bytes the peer wrote into an accelerated socket (ENOENT if not one). */
int connredir_bytes_written_into(int fd, uint64_t *bytes);

#ifdef __cplusplus
}
#endif

#endif /* CONNREDIR_H */
