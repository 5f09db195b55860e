/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The connredir user-space API: what a proxy, in any language, reads from
 * or hands to the layer through getsockopt/setsockopt. The socket option
 * level and numbers, the redirect record (its hops and endpoints), the
 * default redirect context and the cut-through request live here; nothing
 * else does, so this file is the whole contract a proxy depends on. The
 * layer's own map layouts are in maps.h and are no part of it.
 *
 * Fixed-width types only, each field at the offset its natural alignment
 * gives it, on every architecture; the header includes nothing but
 * <stdint.h> (which a freestanding compiler provides too), and nothing at
 * all when compiled for BPF.
 *
 * Byte order: addresses and ports inside records are in network byte
 * order, as in a struct sockaddr; every other field is in host order.
 */
#ifndef CONNREDIR_ABI_UAPI_H
#define CONNREDIR_ABI_UAPI_H

#ifdef __bpf__
/*
 * BPF programs have no C library. These are the types of <linux/types.h>
 * (__u8 .. __u64, unsigned long long for 64 bits on every architecture),
 * so a field's address is the __u64 * that BPF helpers take.
 */
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

/* ---- Socket options: getsockopt/setsockopt on a private level. */

/* The private socket option level ("CNR" in ASCII). */
#define CONNREDIR_SOL 0x434e52
/* get: the connection's redirect records; set: hand records to a new socket. */
#define CONNREDIR_SO_RECORDS 1
/* get: the redirect context, for the service that redirected the flow. */
#define CONNREDIR_SO_CONTEXT 2
/*
 * get, on a listening TCP socket or a bound UDP socket: the id (uint32_t) of
 * the service registered for the socket's local address; ENOENT when none
 * is, EINVAL when the socket does not listen (TCP) or is not bound (UDP).
 * Where the layer is not active the kernel answers EOPNOTSUPP, as for every
 * option of this level.
 */
#define CONNREDIR_SO_SERVICE 3

/*
 * get: a 4-byte 1 when the socket's peer is local and its data bypasses the
 * TCP stack (sockmap acceleration): read it with read()/recv(), not
 * splice(), which does not see that data. 0 otherwise.
 */
#define CONNREDIR_SO_ACCELERATED 4

/*
 * set, for a service whose flow is accelerated on both of its legs, on the
 * socket a direction reads from (struct connredir_cut_through): from now on,
 * what this socket's peer writes goes straight to the peer of the caller's
 * other socket named in `to`, without passing through the caller. The
 * caller has inspected the first bytes and wants the rest moved by the
 * kernel. `received` is how many bytes the caller has read from this socket
 * in all; it must have written them all to `to` first. When the peer has
 * written more than that (bytes in flight), the answer is EAGAIN: read
 * them, forward them, and ask again, so no byte overtakes another.
 * EOPNOTSUPP when one of the four sockets is not accelerated, EACCES when
 * the two sockets are not both the caller's service's, EALREADY when done.
 * After it, the socket only reads EOF (or an error) when the peer closes.
 * Set only: the count of bytes is CONNREDIR_SO_BYTES_WRITTEN.
 */
#define CONNREDIR_SO_CUT_THROUGH 5

/*
 * get: a 64-bit count of all bytes this socket's peer has written into it
 * socket to socket, read by the caller or, after a cut-through
 * (CONNREDIR_SO_CUT_THROUGH), moved past it (for idle detection and byte
 * counts). ENOENT when not accelerated. Get only.
 */
#define CONNREDIR_SO_BYTES_WRITTEN 6

/* Linux transparent-proxy compatibility: answered from the record. */
#define CONNREDIR_SO_ORIGINAL_DST 80 /* SOL_IP, SO_ORIGINAL_DST */
#define CONNREDIR_IP6T_SO_ORIGINAL_DST 80 /* SOL_IPV6, IP6T_SO_ORIGINAL_DST */

/* ---- The redirect record. */

/* "CNRR", first field of every record blob. */
#define CONNREDIR_RECORD_MAGIC 0x52524e43u
/*
 * The version written by this layer; readers accept 1..=this. Version 2
 * appends client_comm; a version 1 blob ends before it (no command known).
 * Version 3 appends the seal: records belong to the layer.
 */
#define CONNREDIR_RECORD_VERSION 3
/* A flow is redirected at most this many times; past that it goes direct. */
#define CONNREDIR_MAX_HOPS 8

/* One endpoint: an IPv4 address sits in the first 4 bytes of addr. */
struct connredir_endpoint {
	uint16_t family; /* AF_INET (2) or AF_INET6 (10); 0 when unknown */
	uint16_t port; /* network byte order */
	uint32_t scope_id;
	uint8_t addr[16]; /* network byte order */
};

/* One redirect: which service took the flow, and where it was going. */
struct connredir_hop {
	uint32_t service_id;
	uint32_t reserved;
	uint64_t time_ns; /* CLOCK_BOOTTIME when the redirect happened */
	struct connredir_endpoint original_dst; /* destination before the redirect */
	struct connredir_endpoint local; /* the redirected socket's own address */
};

/*
 * The redirect records of a connection: the chain of services that redirected
 * it so far, oldest first, and the process that opened the flow.
 * `size` is the number of bytes of the blob as written; a reader accepts any
 * size at least as large as version 1 and ignores what it does not know.
 */
struct connredir_record {
	uint32_t magic;
	uint16_t version;
	uint16_t size;
	uint16_t hop_count;
	uint16_t flags;
	uint32_t client_pid; /* tgid of the process that opened the flow */
	uint32_t client_uid;
	uint32_t reserved;
	uint64_t client_cgroup_id;
	struct connredir_hop hops[CONNREDIR_MAX_HOPS];
	/* Version 2: the command name (comm) of the thread that opened the
	 * flow, NUL-padded; all zero when unknown. */
	uint8_t client_comm[16];
	/*
	 * Version 3: SipHash-2-4, under the layer's secret key (the seal_key
	 * map), of every byte the layer reads: the header (the bytes before
	 * hops), the hop_count hops in use, then client_comm; unused hop slots
	 * are not covered, and the layer zeroes them when it takes a record.
	 * The layer computes it when it hands the records out
	 * (CONNREDIR_SO_RECORDS) and checks it when a service hands them back:
	 * a process that is not root may only set a record the layer issued
	 * whose last hop is its own service. Opaque: readers ignore it; a
	 * record built or changed by hand is unsealed.
	 */
	uint64_t seal;
};

/* Size of a version 1 record: everything before client_comm. */
#define CONNREDIR_RECORD_V1_SIZE __builtin_offsetof(struct connredir_record, client_comm)
/* Size of a version 2 record: everything before the seal. */
#define CONNREDIR_RECORD_V2_SIZE __builtin_offsetof(struct connredir_record, seal)

/* ---- Redirect contexts (CONNREDIR_SO_CONTEXT). */

/* The largest context a service can have: a buffer this large holds any. */
#define CONNREDIR_MAX_CONTEXT 1024

/* The default redirect context: the original destination and local address. */
struct connredir_default_context {
	struct connredir_endpoint remote;
	struct connredir_endpoint local;
};

/* ---- Cut-through (CONNREDIR_SO_CUT_THROUGH). */

/* A socket's own view of its 4-tuple: IPv4 as IPv4-mapped, host-order ports. */
struct connredir_sock_tuple {
	uint8_t local_addr[16];
	uint8_t remote_addr[16];
	uint16_t local_port;
	uint16_t remote_port;
};

/* The CONNREDIR_SO_CUT_THROUGH request. */
struct connredir_cut_through {
	/* Bytes the caller has read from the socket, in all. */
	uint64_t received;
	/* The caller's socket to send to, by its own 4-tuple; the layer looks
	 * it up in the namespace of the socket the option is set on. */
	struct connredir_sock_tuple to;
	uint32_t reserved;
};

#endif /* CONNREDIR_ABI_UAPI_H */
